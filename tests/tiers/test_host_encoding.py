"""``tiers.host_encoding`` (issue 17): host slots hold int8 / int4 payloads, the budget counts
those bytes, blocks read back up are the encoding's round trip, spills to a disk of the same
encoding are not rounded twice, and exact mode refuses a lossy host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hkv import Config, ConfigError, wrap
from hkv.blocks import BlockKey, BlockLayout
from hkv.encoding import decode, encode
from hkv.tiers.host import HostTier
from hkv.tiers.manager import TierManager

from helpers.models import block_bytes, prompt, wrap_config

SMOLLM2 = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64, dtype=torch.float16)
SMALL = BlockLayout(kv_heads=2, block_tokens=16, head_dim=8, dtype=torch.float32)


def _blocks(layout: BlockLayout, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n, *layout.shape, generator=gen) * 2
    blocks[:, 0, :, :, 1] += 9  # an outlier key channel, as real KV has
    return blocks.to(layout.dtype)


def _round_trip(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    out = torch.empty_like(blocks)
    decode(encode(blocks, encoding), encoding, out)
    return out


def _keys(n: int, tag: int = 0) -> list[BlockKey]:
    return [BlockKey(bytes([tag]) + i.to_bytes(15, "little")) for i in range(n)]


def _manager(tmp_path: Path, layout: BlockLayout, *, device: int, host: int, host_encoding: str,
             disk_encoding: str = "none") -> TierManager:  # fmt: skip
    """Budgets in blocks: the device in raw blocks, the host in slots of its encoding."""
    slot = HostTier(layout, 1 << 20, encoding=host_encoding).slot_nbytes
    config = Config(tiers={"device": device * layout.nbytes, "host": host * slot, "disk": "64MiB", "path": str(tmp_path / "store"),
                           "host_encoding": host_encoding, "disk_encoding": disk_encoding})  # fmt: skip
    return TierManager(config, layout, device="cpu")


@pytest.mark.parametrize(("encoding", "limit"), [("int8", 0.52), ("int4", 0.28)])
def test_host_bytes_per_block_within_the_targets(encoding: str, limit: float) -> None:
    """Issue 17's targets for host RAM at SmolLM2's layout: <= 0.52x (int8), <= 0.28x (int4) of
    fp16, scales included; the same budget holds that many more blocks, and used bytes count slots."""
    budget = 64 * SMOLLM2.nbytes
    raw, packed = HostTier(SMOLLM2, budget), HostTier(SMOLLM2, budget, encoding=encoding)
    assert packed.slot_nbytes / SMOLLM2.nbytes <= limit
    assert packed.slot_nbytes == encode(_blocks(SMOLLM2, 1), encoding).shape[1]  # the scales live in the slot
    assert packed.n_slots == budget // packed.slot_nbytes >= int(raw.n_slots / limit)
    packed.put_many(_keys(3), _blocks(SMOLLM2, 3))
    assert packed.used_bytes() == 3 * packed.slot_nbytes <= budget
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == packed.n_slots * packed.slot_nbytes


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_a_block_demoted_to_the_host_comes_back_as_the_round_trip(tmp_path: Path, encoding: str) -> None:
    blocks = _blocks(SMALL, 6)
    keys = _keys(6)
    with _manager(tmp_path, SMALL, device=8, host=8, host_encoding=encoding) as manager:
        manager.put_many(keys, blocks)
        manager.demote(keys, to="host")
        assert all(manager.where(key) == {"host"} for key in keys)
        expected = _round_trip(blocks, encoding)
        assert not torch.equal(expected, blocks)  # lossy: the comparison below can fail
        assert torch.equal(torch.stack([manager.read(key) for key in keys]), expected)
        assert torch.equal(manager.gather(keys), expected)  # promoted: decoded on the way up
        assert all(manager.where(key) == {"device", "host"} for key in keys)
        out = torch.empty(2, SMALL.kv_heads, 3, SMALL.block_tokens, SMALL.head_dim, dtype=SMALL.dtype)
        manager.demote(keys[:3], to="host")
        manager.gather_into([key.digest for key in keys[:3]], out)  # read from the host slots without promoting
        assert torch.equal(out.permute(2, 0, 1, 3, 4), expected[:3])
        assert manager.stats().tiers["host"].used_bytes == 6 * manager.host_pool.slot_nbytes


def test_evictions_fill_an_encoded_host_with_more_blocks(tmp_path: Path) -> None:
    """The same host budget in bytes holds ~3.6x more int4 blocks; puts past the device evict
    into it (device -> host moves encode) and every block reads back as its round trip."""
    n = 20
    blocks, keys = _blocks(SMOLLM2, n, seed=3), _keys(n)
    budget = 4 * SMOLLM2.nbytes
    config = Config(tiers={"device": 2 * SMOLLM2.nbytes, "host": budget, "disk": "64MiB", "path": str(tmp_path / "store"),
                           "host_encoding": "int4"})  # fmt: skip
    with TierManager(config, SMOLLM2, device="cpu") as manager:
        for i in range(n):
            manager.put(keys[i], blocks[i])
        stats = manager.stats().tiers
        assert stats["host"].blocks == budget // manager.host_pool.slot_nbytes > 3 * 4  # raw, it would be 4
        assert stats["host"].used_bytes <= budget
        expected = _round_trip(blocks, "int4")
        for i, key in enumerate(keys):
            where = manager.where(key)
            got = manager.read(key)
            assert torch.equal(got, blocks[i] if where == {"device"} else expected[i]), (i, where)


def test_a_spill_to_a_disk_of_the_same_encoding_comes_back_as_the_round_trip(tmp_path: Path) -> None:
    """Host int4 over disk int4: blocks spilled to disk and read back (disk -> host -> device,
    and the disk read of :meth:`read`) are decode(encode(block))."""
    n = 12
    blocks, keys = _blocks(SMALL, n, seed=5), _keys(n)
    once = _round_trip(blocks, "int4")
    with _manager(tmp_path, SMALL, device=2, host=3, host_encoding="int4", disk_encoding="int4") as manager:
        for key, block in zip(keys, blocks):  # each put evicts: device -> host (encoded) -> disk (spilled)
            manager.put(key, block)
        on_disk = [key for key in keys if manager.where(key) == {"disk"}]
        rows = [keys.index(key) for key in on_disk]
        assert len(on_disk) == n - 2 - 3  # beyond the device (2) and the host (3)
        assert torch.equal(torch.stack([manager.read(key) for key in on_disk]), once[rows])
        assert torch.equal(manager.gather(on_disk[:2]), once[rows[:2]])  # disk -> staging (int4 payloads) -> device


def _uncanonical_int4(blocks: torch.Tensor) -> torch.Tensor:
    """int4 payloads whose codes all sit in [0, 7]: decoding and encoding them again would give
    other bytes, so a path that keeps these bytes did not decode and re-encode."""
    payload = encode(blocks, "int4")
    codes = blocks[0].numel() // 2
    payload[:, :codes] &= 0x77
    again = encode(torch.empty_like(blocks).copy_(_decoded(payload, blocks)), "int4")
    assert not torch.equal(again, payload)
    return payload


def _decoded(payload: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    decode(payload, "int4", out)
    return out


def test_int4_payloads_cross_between_host_and_an_int4_disk_as_they_are(tmp_path: Path) -> None:
    """A spill writes the host slot's bytes as the record's payload, and a read from disk into a
    host slot copies the record's payload: no decode and re-encode either way."""
    blocks, keys = _blocks(SMALL, 4, seed=9), _keys(4, tag=1)
    payload = _uncanonical_int4(blocks)
    with _manager(tmp_path, SMALL, device=2, host=4, host_encoding="int4", disk_encoding="int4") as manager:
        manager.put_many(keys, blocks)
        manager.demote(keys, to="host")
        host = manager.host_pool
        slots = host.slots([key.digest for key in keys])
        host.data[slots] = payload  # as if these bytes had been encoded here
        manager.demote(keys, to="disk")  # the spill
        assert all(manager.where(key) == {"disk"} for key in keys)
        staged = torch.empty_like(payload)
        manager.store.get_many_into(keys, staged, encoding="int4")
        assert torch.equal(staged, payload)  # the records hold the host's bytes
        manager.gather(keys[:2])  # disk -> host slots -> device
        assert torch.equal(host.data[host.slots([key.digest for key in keys[:2]])], payload[:2])
        assert torch.equal(manager.read(keys[0]), _decoded(payload, blocks)[0])


def test_clean_host_copies_encoded_host_slots_as_they_are(tmp_path: Path) -> None:
    """The prefetcher's clean-up of host-only blocks (``clean_host``) writes an int4 host's slot
    bytes as the records of an int4 disk (no decode and re-encode), and a raw disk under an int8
    host gets the round trip the host holds."""
    blocks, keys = _blocks(SMALL, 4, seed=11), _keys(4, tag=2)
    payload = _uncanonical_int4(blocks)
    with _manager(tmp_path / "int4", SMALL, device=2, host=4, host_encoding="int4", disk_encoding="int4") as manager:
        manager.put_many(keys, blocks)
        manager.demote(keys, to="host")
        host = manager.host_pool
        host.data[host.slots([key.digest for key in keys])] = payload
        manager.store  # noqa: B018 - opened: clean_host leaves a disk never opened alone
        assert manager.clean_host(4) == 4
        manager.flush()
        assert all(manager.where(key) == {"host", "disk"} for key in keys)
        staged = torch.empty_like(payload)
        manager.store.get_many_into(keys, staged, encoding="int4")
        assert torch.equal(staged, payload)
    with _manager(tmp_path / "raw", SMALL, device=2, host=4, host_encoding="int8") as manager:
        manager.put_many(keys, blocks)
        manager.demote(keys, to="host")
        manager.store  # noqa: B018
        assert manager.clean_host(4) == 4
        manager.flush()
        stored = torch.empty_like(blocks)
        manager.store.get_many_into(keys, stored)
        assert torch.equal(stored, _round_trip(blocks, "int8"))


def test_a_raw_disk_under_an_encoded_host_stores_the_round_trip(tmp_path: Path) -> None:
    blocks, keys = _blocks(SMALL, 8, seed=7), _keys(8)
    with _manager(tmp_path, SMALL, device=2, host=2, host_encoding="int8") as manager:
        for key, block in zip(keys, blocks):  # device -> host (int8) -> disk (decoded: the disk is raw)
            manager.put(key, block)
        passed_host = [manager.where(key) != {"device"} for key in keys]  # the last two never left the device
        assert passed_host == [True] * 6 + [False] * 2
        manager.demote(keys, to="disk")
        expected = torch.where(torch.tensor(passed_host).view(-1, 1, 1, 1, 1), _round_trip(blocks, "int8"), blocks)
        assert torch.equal(torch.stack([manager.read(key) for key in keys]), expected)


def test_exact_mode_refuses_a_lossy_host_encoding() -> None:
    with pytest.raises(ConfigError, match="tiers.host_encoding = 'int4' is lossy"):
        Config.load(tiers={"host_encoding": "int4"}, attention={"mode": "exact"})
    with pytest.raises(ConfigError, match="tiers.host_encoding = 'fp8'"):
        Config.load(tiers={"host_encoding": "fp8"})
    assert Config.load(tiers={"host_encoding": "none"}, attention={"mode": "exact"}).tiers.host_encoding == "none"


def test_an_int8_host_generates_the_tokens_of_a_raw_one(tiny_lm, tmp_path: Path) -> None:
    """A sparse run whose blocks go through the host generates the same 8 greedy tokens with the
    host in int8 as raw, on a tiny random model. (int4 does not on this model: its near-uniform
    random attention turns the larger rounding into other tokens after 5; int4's check is the
    SmolLM2 passkey below.)"""
    encoding = "int8"
    model = tiny_lm()
    ids = prompt(300)
    outs = {}
    for name in ("none", encoding):
        config = wrap_config(model, tmp_path / name, mode="sparse", prefetch=False)
        config = Config.load(config, env={}, tiers={"host_encoding": name, "host": 48 * block_bytes(model)})
        with wrap(model, config) as rt, rt.new_cache() as cache:
            out = model.generate(ids, cache=cache, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            moved = rt.stats().moved_bytes
            assert moved["device->host"] > 0 and rt.stats().tiers["host"]["used_bytes"] > 0  # the host tier was used
            if name != "none":  # encoded blocks are decoded on their way up (a raw host is read in place on a CPU)
                assert moved["host->device"] > 0
            assert rt.stats().tiers["host"]["used_bytes"] % rt.manager.host_pool.slot_nbytes == 0
            outs[name] = out
    assert torch.equal(outs["none"], outs[encoding])
    assert outs["none"].shape[1] == 308


@pytest.mark.slow
def test_smollm2_finds_the_passkey_through_an_int4_host(smollm2, tmp_path: Path) -> None:
    """SmolLM2, a 2K-token passkey prompt, sparse attention over a quarter of it, the device tier a
    quarter of the KV and the rest in host RAM: the key is found with the host in int4 as with it
    raw (the blocks read back from the host are int4 round trips)."""
    from hkv.passkey import passkey_answer, passkey_prompt

    model, tokenizer = smollm2
    ids, key = passkey_prompt(tokenizer, 2048, 0.5, seed=7)
    ids = torch.tensor([ids])
    layout = BlockLayout(model.config.num_key_value_heads, 64, model.config.hidden_size // model.config.num_attention_heads,
                         torch.float16)  # fmt: skip
    kv = model.config.num_hidden_layers * (ids.shape[1] // 64 + 1) * layout.nbytes
    answers = {}
    for encoding in ("none", "int4"):
        config = Config(
            tiers={"device": kv // 4, "host": kv, "disk": "256MiB", "path": str(tmp_path / encoding), "dtype": "float16",
                   "host_encoding": encoding},
            attention={"mode": "sparse", "budget_tokens": 512, "sink_tokens": 64, "local_tokens": 128},
            prefetch={"enabled": False},
        )  # fmt: skip
        with wrap(model, config) as rt:
            out = rt.generate(ids, max_new_tokens=7, do_sample=False)
            stats = rt.stats()  # blocks went through the host (a raw one is read in place on a CPU, an encoded one decoded up)
            assert stats.moved_bytes["device->host"] > 0 and (encoding == "none" or stats.moved_bytes["host->device"] > 0)
        answers[encoding] = passkey_answer(tokenizer, out[0, ids.shape[1] :])
    assert answers == {"none": key, "int4": key}


@pytest.mark.cuda
@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_cuda_encoded_host_decodes_on_the_copy_stream(tmp_path: Path, encoding: str) -> None:
    """On a GPU: demotions encode on the device, promotions copy the payload up and decode it on
    the copy stream (an event per move); the blocks read back are the round trip, on the GPU."""
    blocks, keys = _blocks(SMALL, 6, seed=11), _keys(6)
    slot = HostTier(SMALL, 1 << 20, encoding=encoding).slot_nbytes
    config = Config(tiers={"device": 8 * SMALL.nbytes, "host": 8 * slot, "disk": "64MiB", "path": str(tmp_path / "s"),
                           "host_encoding": encoding})  # fmt: skip
    with TierManager(config, SMALL, device="cuda") as manager:
        assert manager.host_pool.pin_memory and manager.host_pool.data.dtype == torch.uint8
        manager.put_many(keys, blocks.cuda())
        manager.demote(keys, to="host")
        manager.promote(keys[:3])
        assert isinstance(manager._entries[keys[0].digest].event, torch.cuda.Event)  # decoded on the copy stream
        out = manager.gather(keys)
        assert out.device.type == "cuda"
        # The round trip on the GPU (the encode ran there): the GPU's division may round a tie
        # differently from the CPU's, which moves a code by one step, so the CPU's is no reference.
        expected = _round_trip(blocks.cuda(), encoding).cpu()
        assert torch.allclose(out.cpu(), expected, rtol=0, atol=1e-5)  # the GPU's decode may round its last bit otherwise
        assert torch.allclose(torch.stack([manager.read(key) for key in keys]), expected, rtol=0, atol=1e-5)
        assert torch.allclose(expected, _round_trip(blocks, encoding), rtol=0, atol=float(blocks.abs().max()) / 7)  # one step at most
