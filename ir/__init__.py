"""The graph IR: types, Graph/Node/Value, the op registry and rule tables, printer, verifier."""

from .errors import MeshweaveError, UnsupportedOpError, VerificationError
from .graph import Graph, Node, Value
from .printer import print_graph
from .registry import OPS, RuleTable, lookup, register_op
from .sharding import Partial, Replicate, Shard
from .types import ScalarType, TensorType
from .verify import verify

__all__ = [
    "OPS",
    "Graph",
    "MeshweaveError",
    "Node",
    "Partial",
    "Replicate",
    "RuleTable",
    "ScalarType",
    "Shard",
    "TensorType",
    "UnsupportedOpError",
    "Value",
    "VerificationError",
    "lookup",
    "print_graph",
    "register_op",
    "verify",
]
