"""What every stage shares and none owns: exceptions (``errors``), atomic file io (``io``), the run
directory's lock, progress bars, timing, quiet third-party output, provenance of a run, plain-text
tables, per-prompt segments, data-parallel plumbing and the dataclass-config machinery
(``config``, ``config_source``). Nothing here imports a stage, a model or the math."""
