"""Build stages, one module each. A stage module has ``DEPENDS`` (earlier stages), ``inputs(ctx)``
(JSON-able values that, with the code and the dependencies' keys, name its cache entry),
``run(ctx, out) -> meta`` (writes into the empty directory ``out``) and optionally
``check(ctx, result)`` (runs on cached results too)."""
