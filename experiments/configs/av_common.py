"""Shared set-up of the paper's audio-visual benchmarks (ResNet-18 encoders, linear late fusion,
the reference optimiser: Adam with coupled L2 1e-4, eps 1e-7, lr 1e-4, constant for 780 steps then
cosine annealing with warm restarts)."""

from experiments.configs.base import base_config, set_mcr, switches

SMOKE_RESNET = dict(widths=(4, 8, 8, 16), blocks=(1, 1, 1, 1))


def av_config(name: str, arg, *, mipd_weight: float, uni_weight: float, builder_kwargs: dict | None = None):
    c = base_config(arg)
    c.data = base_config().data
    c.data.name = name
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.manual_dir = ""
    c.data.builder_kwargs = dict(builder_kwargs or {})
    c.data.modalities = ()
    c.data.worker_count = 0  # grain reader processes; on a GPU machine set it to the spare cores (docs/data.md)
    c.model.encoder = "resnet18"
    c.model.widths = (64, 128, 256, 512)
    c.model.blocks = (2, 2, 2, 2)
    c.model.latent_dim = 512
    set_mcr(c, mipd_weight=mipd_weight, uni_weight=uni_weight)
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 1e-4
    c.optim.eps = 1e-7
    c.optim.schedule = "reference"
    c.train.batch_size = 32
    c.train.num_epochs = 100
    c.train.patience = 20
    c.eval.batch_size = 32
    if "smoke" in switches(arg):
        c.model.widths, c.model.blocks = SMOKE_RESNET["widths"], SMOKE_RESNET["blocks"]
        c.model.latent_dim = 16
        set_mcr(c, num_permutations=4)
        c.data.builder_kwargs = {**c.data.builder_kwargs, "frame_size": 16}
        c.train.batch_size = 4
        c.train.num_epochs = 1
        c.eval.batch_size = 4
    return c
