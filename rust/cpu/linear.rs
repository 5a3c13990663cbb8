//! Linear-attention kernels on CPU (DyDiLA, LiT).
