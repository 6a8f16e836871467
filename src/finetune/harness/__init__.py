"""The run harness: everything around the research code that makes a run safe to start, stop, resume and record.

Entered only from the entry points (``finetune.train``, ``evaluate``, ``predict``, ``export``, ``lr_find``),
``finetune.run`` and ``scripts/``; the research core (``module``, ``backbones``, ``schedules``, ``metrics``,
``features``, ``data/``) never imports it.

- ``settings``: every setting checked by its config name, once per run;
- ``checkpoint``: checkpoint files read safely, and the model in one loaded for inference;
- ``checkpoints``, ``run_state``, ``signals``, ``throughput``: the Lightning callbacks of a run (resumable and
  interrupt checkpoints, random state and history, a signal to one DDP rank, images per second);
- ``resume``, ``run_folder``, ``results``, ``figures``, ``overrides``: continuing a run, the layout of its folder, its
  ``results.json`` and test figures, and the command-line overrides it was started with;
- ``distributed``: DDP ranks started from their own Hydra job, timeouts, lost ranks;
- ``guards``: torch.compile's fallback and the out-of-memory advice;
- ``quiet``: known-harmless warnings filtered;
- ``private``: every private Lightning/torch API in use, checked against the releases it was read on.
- ``bench``: what the benchmark scripts under ``scripts/`` share (the machine, common overrides, a timed window).
"""
