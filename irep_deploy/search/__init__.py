"""The DES search: SuperNet (B-subnet steps), population operators (Eq. 8-10), Algorithm 1 driver."""
from __future__ import annotations
