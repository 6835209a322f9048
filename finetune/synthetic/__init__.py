"""Demo and test data for the downstream heads: planted signal the heads must recover.

- :mod:`.cells`: tiny shard sets (bundles + shards + manifest) whose crop colour encodes a latent
  value that one gene follows (genes, embed tests);
- :mod:`.encoder`: a tiny exported image encoder with seeded random weights;
- :mod:`.cohort`: a survival cohort in which image, genes and cells each carry part of the risk.
- :mod:`.stain_tiles`: H&E tiles with typed nuclei (the demo bundle's H&E, or drawn from the one cell-type
  look table), the ground the image-to-image demo sets are painted on;
- :mod:`.ihc`: a nuclear IHC painted on them, in the paired layout the virtual-IHC head reads;
- :mod:`.mif`: an mIF panel (+ autofluorescence) painted on them, in the ORION-like layout of the mIF head.

The image-to-image modules are imported by name (``finetune.synthetic.ihc``): they pull in scikit-image.
"""

from .cells import colour_crop, write_synthetic_cells
from .cohort import SIGNATURE_GROUPS, make_cohort
from .encoder import write_tiny_export

__all__ = ["SIGNATURE_GROUPS", "colour_crop", "make_cohort", "write_synthetic_cells", "write_tiny_export"]
