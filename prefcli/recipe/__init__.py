"""Recipes: pydantic schemas, YAML loading, `--set` overrides and actionable errors."""

from .commands import SCHEMAS, RecipeBase
from .loader import LoadedRecipe, dump_recipe, load_recipe

__all__ = ["SCHEMAS", "RecipeBase", "LoadedRecipe", "dump_recipe", "load_recipe"]
