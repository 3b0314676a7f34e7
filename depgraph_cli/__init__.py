"""The application: the ``depgraph`` command line, its subcommands and the demo.

It sits on top of the import order (depgraph → pruning → recovery → evaluation →
depgraph_cli) and is the only package that loads models by name (hub id, folder, or the
built-in default GGUF model, :mod:`depgraph_cli.models`), checks files and outputs before
any work (:mod:`depgraph_cli.outputs`, :mod:`depgraph_cli.model_checks`) and prints reports
(:mod:`depgraph_cli.report_text`). Heavy packages (torch, transformers, the project's own)
are imported inside the command that needs them, so ``--help`` and argument errors answer
at once.
"""

__all__: list[str] = []  # the entry point is depgraph_cli.main:main
