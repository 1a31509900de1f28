"""fine_efficient_seg: fine-stage CPS training on organ crops with UIF filtering (run with `sh run.sh`)."""
