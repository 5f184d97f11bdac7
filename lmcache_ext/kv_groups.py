"""The kinds of KV cache group a chunk can hold, and which of a group's blocks a chunk keeps.

vLLM's hybrid KV cache manager gives each kind of layer its own group and block
table. After a hit of N tokens vLLM gives a group real blocks only where the next
token still reads them: all of them for full attention, the blocks inside the
window before N for sliding-window and chunked local attention (null blocks before
them). A chunk ending at N keeps exactly a group's real blocks inside it, so a hit
that ends where a chunk ends finds every page vLLM will read, and a load never
leaves a real block unwritten (vLLM's prefix cache would keep that block). The rule
is the one vLLM's managers use (`get_num_skipped_tokens`), in tokens.

A Mamba-type group (Mamba, gated delta net, ...; vLLM's "align" cache mode) keeps one
state per request at a block boundary: block p of its table holds the state after
(p + 1) blocks of tokens. A chunk's own record holds no page of it. vLLM keeps a state
only where a step ends, and hands the connector its block id in that step, so the state
at a chunk's end, when vLLM kept one, is a record of its own (`keys.state_key`), and a
hit ends only at a chunk whose state is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "full"
SLIDING = "sliding"
LOCAL = "local"
MAMBA = "mamba"
KINDS = (FULL, SLIDING, LOCAL, MAMBA)


@dataclass(frozen=True)
class KVGroup:
    """One group's layers: `layer_names` (vLLM's order), pages of `page_bytes` bytes for
    blocks of `block_size` tokens; `window`: the sliding window, or the attention chunk
    of chunked local attention, in tokens (0 for full attention and Mamba state); a
    Mamba group's page is one layer's state."""

    kind: str
    layer_names: tuple[str, ...]
    block_size: int
    page_bytes: int
    window: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r}: expected one of {', '.join(KINDS)}")
        if (self.kind in (FULL, MAMBA)) != (self.window == 0) or self.window < 0:
            raise ValueError(
                f"window = {self.window} for a {self.kind} group: expected 0 for full and mamba, > 0 otherwise"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def skipped_tokens(self, computed: int) -> int:
        """Leading tokens whose KV no later token reads, once `computed` are computed."""
        if self.kind == SLIDING:
            return max(0, computed - self.window + 1)
        if self.kind == LOCAL:
            return computed // self.window * self.window
        if self.kind == MAMBA:
            return max(0, computed - 1)
        return 0

    def kept_blocks(self, end_block: int, blocks: int) -> int:
        """How many of the `blocks` blocks that end at block `end_block` (exclusive) a hit
        ending there reads: the last ones. None of a Mamba group's (its state is a record
        of its own)."""
        if self.kind == MAMBA:
            return 0
        first_read = self.skipped_tokens(end_block * self.block_size) // self.block_size
        return max(0, min(blocks, end_block - first_read))

    def describe(self) -> str:
        """The group as it enters the key namespace: kind, window (a Mamba group: its
        state's bytes) and layer count."""
        window = f"{self.page_bytes}B" if self.kind == MAMBA else f"{self.window}" if self.window else ""
        return f"{self.kind}{window}x{self.num_layers}"


def layout_of(groups: tuple[KVGroup, ...]) -> str:
    """The groups' layout in the key namespace ("" for one full-attention group, as
    chunks were keyed before groups existed, so a model without HMA keeps its chunks);
    a group whose block is smaller than the largest says its own ("@64")."""
    if len(groups) == 1 and groups[0].kind == FULL:
        return ""
    block = max((g.block_size for g in groups), default=0)
    return "+".join(g.describe() + (f"@{g.block_size}" if g.block_size != block else "") for g in groups)
