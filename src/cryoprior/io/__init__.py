"""Reading and writing cryo-EM data: MRC images and maps, RELION STAR tables, ParticleStack."""

from cryoprior.io.mrc import (
    MappedStack,
    MrcInfo,
    MrcsWriter,
    read_map,
    read_mrc,
    read_mrc_header,
    write_map,
    write_mrcs,
)
from cryoprior.io.stack import ParticleStack
from cryoprior.io.star import build_optics, link_optics, read_star, resolve_image_names, write_star

__all__ = [
    "MappedStack",
    "MrcInfo",
    "MrcsWriter",
    "ParticleStack",
    "build_optics",
    "link_optics",
    "read_map",
    "read_mrc",
    "read_mrc_header",
    "read_star",
    "resolve_image_names",
    "write_map",
    "write_mrcs",
    "write_star",
]
