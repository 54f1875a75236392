from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.flavors import ratplus_flavors
from ratplus_titan.model.model import RATPlusModel

__all__ = ["RATPlusModel", "RATPlusModelArgs", "ratplus_flavors"]
