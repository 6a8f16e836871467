"""The recipe's extras, one Lightning callback each, switched on from config (``conf/callbacks/<name>.yaml``):

- ``unfreeze``: the backbone frozen for the first epochs, then trained (LP-FT);
- ``ema``: validate, test and checkpoint an exponential moving average of the weights;
- ``mixup``: MixUp / CutMix of training batches (soft targets for the criterion);
- ``compile``, ``channels_last``: how the network runs, not what it computes.

Each checks its own settings in ``check_settings(node, cfg)``, which the assembly calls before any data is read.
"""
