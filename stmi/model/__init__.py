"""The STMI model (paper eq. 1-20; open choices in docs/design.md).

Importing it registers the tiny open_clip configs ``stmi-tiny`` and ``stmi-tiny-p8``.
"""

from stmi.model import backbone  # noqa: F401 - registers "stmi-tiny"(-p8) with open_clip on import
from stmi.model.network import STMI, STMIOutput, build_model
from stmi.model.sfm import sfm_attention

__all__ = ["STMI", "STMIOutput", "build_model", "sfm_attention"]
