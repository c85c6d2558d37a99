"""Training on prepared datasets: the loader (`data`) and a thin DDP trainer (`train`)."""
