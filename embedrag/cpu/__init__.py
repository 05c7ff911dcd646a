"""CPU kernels: packed sequences, fast dropout masks, fp32 attention under bf16, RMSNorm."""
