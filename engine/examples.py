"""Example classifiers written for the demo and the README: spam, urgency and sentiment.

Trained at first start from the small CSV files in ``example_data/``; nothing here depends on
data outside the package.
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

from headfleet.errors import NotFoundError

EXAMPLES = {"spam": "spam.csv", "urgency": "urgency.csv", "sentiment": "sentiment.csv"}

DEMO_TEXTS = [
    "You have won a free iPhone! Click the link to claim your prize",
    "The checkout page has been failing for all customers since noon",
    "Thanks for the quick delivery, the new headphones sound great",
    "Can we move our weekly sync to Thursday?",
]


def ensure_examples(engine, tenant: str, log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Train each example classifier for ``tenant`` unless a version of it already exists."""
    from headfleet.heads import load_examples

    for name, filename in EXAMPLES.items():
        try:
            engine.registry.resolve(tenant, name)
            continue
        except NotFoundError:
            pass
        with resources.as_file(resources.files("headfleet.engine") / "example_data" / filename) as path:
            manifest = engine.train(tenant, name, load_examples(path))
        m = manifest["metrics"]
        log(f"trained example classifier {tenant}/{manifest['id']} from {filename}: "
            f"holdout accuracy {m['accuracy']:.2f} on {m['n_holdout']} examples")
    return list(EXAMPLES)
