"""The time MCP server (module `clock`, so it never shadows the standard library's `time`): the current time in
a time zone, conversion between zones, date arithmetic and weekdays. Zones are IANA names ("Europe/Paris").

    python -m minicpm4.apps.mcp_servers.clock
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("time", log_level="WARNING")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris')") from None


def _date(text: str, field: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ToolError(f"{field} must be a date as YYYY-MM-DD, got {text!r}") from None


@server.tool()
def get_current_time(timezone: str) -> str:
    """The current date and time in a time zone, ISO 8601."""
    return datetime.now(_zone(timezone)).isoformat(timespec="seconds")


@server.tool()
def convert_time(source_timezone: str, time: str, target_timezone: str) -> str:
    """Convert a time of day (HH:MM, today) from one time zone to another."""
    try:
        hour, minute = (int(x) for x in time.split(":"))
        local = datetime.now(_zone(source_timezone)).replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise ToolError(f"time must be HH:MM (24-hour), got {time!r}") from None
    return local.astimezone(_zone(target_timezone)).isoformat(timespec="minutes")


@server.tool()
def add_days(start_date: str, days: int) -> str:
    """The date a number of days after (or, if negative, before) a date given as YYYY-MM-DD."""
    return (_date(start_date, "start_date") + timedelta(days=days)).isoformat()


@server.tool()
def days_between(start_date: str, end_date: str) -> int:
    """The number of days from start_date to end_date (YYYY-MM-DD)."""
    return (_date(end_date, "end_date") - _date(start_date, "start_date")).days


@server.tool()
def day_of_week(day: str) -> str:
    """The weekday of a date given as YYYY-MM-DD."""
    return _date(day, "day").strftime("%A")


if __name__ == "__main__":
    server.run("stdio")
