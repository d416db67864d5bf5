"""The stages, one module per subcommand: ``identify``, ``prefs``, ``align``, ``attack``, ``evaluate``, ``analyze``.

Each stage reads its config (:mod:`safeneuron.config`), uses the core modules and writes
its artifacts to a directory (:class:`safeneuron.artifacts.StageDir` where a run key
applies); :mod:`safeneuron.pipeline` runs them in order and :mod:`safeneuron.cli` calls
them. A stage never imports the CLI or the pipeline.
"""
