"""coarse_base_seg: CPS training of the two coarse residual U-Nets on 160^3 whole volumes, and their export."""
