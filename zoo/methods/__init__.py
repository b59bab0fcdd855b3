"""Methods: thin compositions of zoo.blocks on top of zoo.engine.module.RetrievalModule."""
from .casc import CASC
from .casc_base import CASCBase
from .cccl import CCCL
from .dan import DAN
from .official import check_opt, load_official, map_state, read_official, register_official
from .scan import scan_model
from .sgraf import SGRAF
from .smlstm import SMLSTM
from .vse_infinity import VSEInfinity, VSEInfinityBert
from .vsepp import VSEPP

__all__ = ["CASC", "CASCBase", "CCCL", "DAN", "SGRAF", "SMLSTM", "VSEInfinity", "VSEInfinityBert", "VSEPP", "check_opt",
           "load_official", "map_state", "read_official", "register_official", "scan_model"]
