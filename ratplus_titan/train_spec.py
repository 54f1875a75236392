"""The torchtitan ``TrainSpec`` named ``ratplus``, assembled in one visible place."""

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from ratplus_titan.data.dataset import build_dataloader, build_validator
from ratplus_titan.data.tokenizer import build_tokenizer
from ratplus_titan.infra.parallelize import parallelize_ratplus
from ratplus_titan.model import RATPlusModel, ratplus_flavors

NAME = "ratplus"


def ratplus_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=RATPlusModel,
        model_args=ratplus_flavors,
        parallelize_fn=parallelize_ratplus,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,  # [validation] enable = true, dataset = "bundled" (held-out split)
    )


def register() -> None:
    """Register once per process (re-imports are harmless)."""
    try:
        get_train_spec(NAME)
    except ValueError:
        register_train_spec(NAME, ratplus_train_spec())


register()  # on import: torchtitan looks the spec up by name after importing its custom_import
