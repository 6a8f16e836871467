"""Hydra finds this sweeper by scanning the ``hydra_plugins`` namespace package; see ``optuna_sweeper``."""
