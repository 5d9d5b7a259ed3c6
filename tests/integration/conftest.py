"""The integration tier's fixtures: a private Ray environment and a tiny trained workspace (ray_workspace.py)."""

from tests.integration.ray_workspace import ray_env, workspace  # noqa: F401  (module-scoped Ray fixtures)
