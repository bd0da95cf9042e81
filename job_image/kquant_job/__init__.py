"""kquant's worker: fetch a model, convert it, validate it, publish it with a report."""

__version__ = "0.1.0"
