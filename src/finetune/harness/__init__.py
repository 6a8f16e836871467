"""The run harness: everything around the research code that makes a run safe to start, stop, resume and record.

Entered from the entry points (``finetune.train``, ``evaluate``, ``predict``, ``export``, ``lr_find``, ...),
``finetune.run`` and ``scripts/``.

- ``run_settings``, ``config_keys``: the run's own settings (trainer, devices, seed), and config keys that would
  never be used, refused by name (each component checks its own settings beside its code);
- ``checkpoint_io``, ``checkpoint_data``: checkpoint files read safely, the model in one loaded for inference, and the
  data it brings to the commands that score it;
- ``checkpointing``, ``run_state``, ``signals``, ``divergence``, ``epoch_log``, ``throughput``: the Lightning
  callbacks of a run (resumable, interrupt and atomic checkpoints, random state and history, a signal to one DDP
  rank, a nan loss, a line per epoch, images per second);
- ``resume``, ``run_folder``, ``results``, ``figures``, ``overrides``: continuing a run, the layout of its folder, its
  ``results.json`` and test figures, and the command-line overrides it was started with;
- ``distributed``: DDP ranks started from their own Hydra job, timeouts, lost ranks;
- ``exits``, ``out_of_memory``, ``writable``: one ``Error:`` line for a user's mistake, the out-of-memory advice,
  where outputs may go;
- ``quiet``: known-harmless warnings filtered;
- ``private``: every private Lightning/torch API in use, checked against the releases it was read on;
- ``bench``: what the benchmark scripts under ``scripts/`` share (the machine, common overrides, a timed window).
"""
