"""Generic contrastive losses shared by the recipes.

A loss is a pure function ``fn(outputs, batch, *, axis_name=None, **hparams) -> (loss, metrics)``:
``outputs`` is what the method's forward returned (arrays only), ``batch`` the per-device batch,
``axis_name`` the device axis to gather the other devices' samples over (None on one device). The
value on each device is such that ``pmean`` over the devices equals the loss of the global batch.
Losses are listed by name in ``mmret.registry.LOSSES``; a recipe's own losses live in its folder
under ``mmret/recipes``.
"""
