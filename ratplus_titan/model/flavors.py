"""The model sizes of the paper (DESIGN §1) plus a CPU-sized debug model. Flavors are data."""

from ratplus_titan.model.args import RATPlusModelArgs


class Flavors(dict):
    """A dict whose missing-key error names the field and the allowed values."""

    def __missing__(self, key: str):
        raise KeyError(f"model.flavor={key!r} is unknown: allowed values are {', '.join(self)}")


ratplus_flavors = Flavors({
    "debugmodel": RATPlusModelArgs(dim=256, n_layers=4, n_heads=4, max_seq_len=256),
    # the small-scale reproductions (bench/reproduce): 128-wide heads as the paper's; 50M fits one device call,
    # 125M is GPT-2-small's width and depth
    "50M": RATPlusModelArgs(dim=512, n_layers=8, n_heads=4, max_seq_len=2048),
    "125M": RATPlusModelArgs(dim=768, n_layers=12, n_heads=6, max_seq_len=2048),
    "1B": RATPlusModelArgs(dim=2048, n_layers=24, n_heads=16),
    "3B": RATPlusModelArgs(dim=2560, n_layers=28, n_heads=20),
    "7B": RATPlusModelArgs(dim=4096, n_layers=32, n_heads=32),
})
