"""A separable toy corpus for the data tests: 'science' sentences vs 'spam' sentences, built from word lists."""

import random

SCIENCE = ("energy heat theory proof cell membrane molecule equation gravity orbit planet electron photon "
           "reaction acid enzyme protein gene evolution theorem integral derivative velocity").split()
SPAM = ("click buy cheap deal free shipping price login cart checkout win prize subscribe follow "
        "like share discount offer coupon bonus casino").split()
SMALL = dict(dim=16, bucket=20_000, epoch=25, lr=0.2, min_count=1)  # a toy-sized model that trains in ~1 s


def sentences(words, n, seed, length=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)).capitalize() + "." for _ in range(n)]
