"""The SemiSeg-CSSN library. Sub-packages by job; each imports only the ones listed above it here:

    core/        labels and the label rule, defaults, errors, logging, atomic files, device, AMP, typed config
    volume/      (z, y, x) arrays: HU intensities, resizing, boxes and crops, the network input layer
    networks/    the U-Net and EfficientSegNet, built by name; the input-size rule
    storage/     files on disk: images, LMDB records, checkpoints, model folders, original-release weights
    evaluation/  FLARE22 DSC/NSD, surface distance, the UIF uncertainty scores
    train/       the CPS training engine, losses, distributed helpers
    infer/       the two-stage predictor, label upsampling, post-processing, backends, the folder loop, overlays

Top-level modules sit above all of them: `config` (every stage's schema), `stage_cli` (a training stage's command
line), and the command lines `evaluate` and `original_weights`.
"""
