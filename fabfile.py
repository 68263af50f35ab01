"""Entry point for `fab`: the whole suite lives in tasks/ (also what `invoke` loads)."""
from tasks import ns  # noqa: F401
