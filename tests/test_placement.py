import collections
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from objstore.placement import replicas

NODES = ["n1", "n2", "n3", "n4", "n5"]


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


@given(st.binary(min_size=32, max_size=32), st.permutations(NODES))
def test_order_of_membership_does_not_matter(blob, nodes):
    assert replicas(blob, nodes) == replicas(blob, NODES)
    assert len(set(replicas(blob, nodes))) == 3


def test_fewer_nodes_than_r_gives_every_node():
    assert sorted(replicas(h(1), ["a", "b"])) == ["a", "b"]


def test_removing_a_node_moves_only_its_blobs():
    moved = 0
    for i in range(2000):
        before = replicas(h(i), NODES)
        after = replicas(h(i), [n for n in NODES if n != "n3"])
        if "n3" not in before:
            assert after == before  # untouched blobs keep their replicas and order
        else:
            moved += 1
            assert [n for n in before if n != "n3"] == after[:2]
    assert 0.5 < moved / 2000 < 0.7  # ~R/N = 3/5 of blobs had a copy on n3


def test_spread_is_even():
    first = collections.Counter(replicas(h(i), NODES)[0] for i in range(5000))
    assert all(800 < c < 1200 for c in first.values()), first
