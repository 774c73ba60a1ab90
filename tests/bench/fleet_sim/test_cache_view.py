"""The simulator's cache view answers as ember's KVIndex does on the same events."""

from __future__ import annotations

import random

from ember.bench.fleet_sim.cache_view import FleetCacheView
from ember.router.kv_index import KVIndex


def test_matches_kv_index_on_random_events():
    rng = random.Random(0)
    urls = [f"w{i}" for i in range(5)]
    chains = [[f"{c:02d}{i:03d}" for i in range(30)] for c in range(4)]
    view, index = FleetCacheView(urls), KVIndex()
    held = {url: set() for url in urls}
    seqs = dict.fromkeys(urls, 0)
    for url in urls:
        index.apply_snapshot(url, {"seq": 0, "tiers": {}})
    for _ in range(300):
        url = rng.choice(urls)
        if rng.random() < 0.6:
            chain = rng.choice(chains)
            hashes = [h for h in chain[:rng.randint(1, 30)] if h not in held[url]]
            event = {"type": "stored", "block_hashes": hashes, "tier": "device"}
            held[url].update(hashes)
        elif held[url]:
            hashes = rng.sample(sorted(held[url]), min(3, len(held[url])))
            event = {"type": "removed", "block_hashes": hashes, "tier": "device"}
            held[url].difference_update(hashes)
        else:
            continue
        view.apply_events(url, [event])
        seqs[url] += 1
        assert index.apply_batch(url, {"seq": seqs[url], "events": [event]})
        query = rng.choice(chains)[:rng.randint(0, 30)]
        expected = {w: len(tiers) for w, tiers in index.prefix_match(query).items()}
        assert view.leading_blocks(query) == expected
        assert view.cached_tiers(query) == index.prefix_match(query)
