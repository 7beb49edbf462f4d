"""Data formats of docs/formats.md and their validating readers: prompts (``prompts``), scores for
the dual (``score_table``), preference files (``preferences``), constraint strings
(``constraints``), the stage records ``dual.json`` and ``report.json`` (``records``) and the
report's table and plots (``report_view``), and a synthetic scores generator for tests and
benchmarks (``example``)."""
