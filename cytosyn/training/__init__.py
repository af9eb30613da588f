"""Training: the LightningModule, trainer factory and run loop (``cytosyn train``), and the EMA.

Importing this package makes torchvision importable first (see :mod:`cytosyn.compat`), because
Lightning imports it through torchmetrics.
"""

from cytosyn.compat import import_torchvision

import_torchvision()
