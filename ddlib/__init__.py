"""ddlib: the small core behind the ddlab notebooks.

One flat module per job:

- ``runtime``  seeding and device selection (the only place either happens)
- ``data``     dataset registry (scikit-learn digits embedded; torchvision datasets under one root)
- ``models``   ``build(name, input_shape, num_classes)`` for MLP, LeNet, ConvNet, AlexNet, VGG11, ResNet18
- ``unroll``   the differentiable SGD inner loop shared by every distillation method
- ``augment``  differentiable siamese augmentation (DSA) with explicit seeds, for unrolls and training
- ``zca``      ZCA whitening (kornia) fitted on training images, batched, saved to safetensors
- ``train``    ordinary training, accuracy, and the K-network evaluation protocol
- ``results``  run folders, metrics, figures, image grids and ``results/summary.csv``
- ``linear``   closed-form least squares and the one-step distilled sets of Wang et al. (2018), sec. 3.4
- ``dd``       Dataset Distillation (Wang et al. 2018): learned pixels and step sizes, checkpoint/resume
- ``coreset``  real-image baselines: random, class means, k-means, herding, k-center
- ``buffers``  expert trajectories: per-epoch parameters in safetensors with metadata; shards, resume, merge
- ``mtt``      Matching Training Trajectories (Cazenavette et al. 2022) on the shared unroll; its evaluation
- ``ssl``      Barlow Twins teachers (loss, projector, kornia views), stored by key; gradient-noise measurement
- ``mkdt``     MKDT: KD experts of an SSL teacher, high-loss init, MTT on the KD objective, pre-train + linear probe
- ``reproduce`` the papermill batch driver behind ``make reproduce``
"""

__version__ = "0.1.0"
