"""The paper's applications (MiniCPM4 report, section 6), built on the layers below: survey/ is MiniCPM4-Survey."""
