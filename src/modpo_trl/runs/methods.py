"""Every method the run engine knows, by the name a recipe's `method:` gives."""

from __future__ import annotations

from .dpa import DPA
from .method import Method
from .moc import MOC
from .modpo import MODPO
from .recipe import Recipe

METHODS: dict[str, Method] = {m.name: m for m in (MODPO(), MOC(), DPA())}


def method_of(recipe: Recipe) -> Method:
    """The method that trains and evaluates `recipe` (its `method:` is validated when the recipe loads)."""
    return METHODS[recipe.method]
