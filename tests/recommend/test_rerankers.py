import numpy as np
import pytest
import torch

from dpo4rec.config import RecommendConfig
from dpo4rec.metrics import mean_metrics
from dpo4rec.recommend.baselines import baseline_metrics
from dpo4rec.recommend.features import list_tensors, user_knowledge
from dpo4rec.recommend.models import MODELS, ModelSpec, Reranker, build_model, register, rerankers
from dpo4rec.recommend.train import build_recommender, evaluate, train_recommender


def test_the_three_papers_are_registered():
    assert {"dlcm", "prm", "setrank"} <= set(rerankers()) and "sasrec" in MODELS


@pytest.mark.parametrize("backbone", rerankers())
def test_each_backbone_learns_and_beats_random(backbone, ml100k):
    protocol, _ = ml100k
    lists = list_tensors(protocol.lists)
    config = RecommendConfig(backbone=backbone, knowledge=False, max_epochs=3, patience=3, device="cpu")
    model = build_recommender(config, protocol.items, lists)
    before = {k: v.clone() for k, v in model.named_parameters()}
    result = train_recommender(model, lists, None, config, progress=False)
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "item_embedding.weight" in changed and len(changed) > len(before) // 2
    test = lists.of_split("test")
    got = mean_metrics(evaluate(model, test, None))
    chance = baseline_metrics(test.items.numpy(), test.labels.numpy(), protocol.interactions, protocol.users)["random"]
    assert got["map@5"] > chance["map@5"] + 0.1 and got["ndcg@5"] > chance["ndcg@5"] + 0.1


@pytest.mark.parametrize("backbone", rerankers())
def test_knowledge_changes_scores_and_shapes_hold(backbone, ml100k):
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists).subset(np.arange(64))
    config = RecommendConfig(backbone=backbone, device="cpu", dropout=0.0)
    model = build_recommender(config, protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors), emb.encoder).eval()
    vectors = torch.randn(64, emb.dim)
    with torch.no_grad():
        a = model(lists.items, lists.history, vectors)
        b = model(lists.items, lists.history, -vectors)
        unknown = model(lists.items, lists.history, vectors, torch.zeros(64, dtype=torch.bool))
        unknown2 = model(lists.items, lists.history, -vectors, torch.zeros(64, dtype=torch.bool))
    assert a.shape == (64, lists.items.shape[1])
    assert not torch.allclose(a, b)  # the knowledge vector reaches the scores
    assert torch.allclose(unknown, unknown2)  # unknown users all get the same learned vector


def test_setrank_is_permutation_equivariant(ml100k):
    protocol, emb = ml100k
    lists = list_tensors(protocol.lists).subset(np.arange(32))
    model = build_recommender(RecommendConfig(backbone="setrank", device="cpu"), protocol.items, lists, emb.dim, (emb.item_index, emb.item_vectors)).eval()
    perm = torch.randperm(lists.items.shape[1], generator=torch.Generator().manual_seed(0))
    vectors = torch.randn(32, emb.dim)
    with torch.no_grad():
        scores = model(lists.items, lists.history, vectors)
        permuted = model(lists.items[:, perm], lists.history, vectors)
    assert torch.allclose(scores[:, perm], permuted, atol=1e-5)


def test_a_new_model_plugs_in_by_registering(ml100k):
    @register("mean-mlp-test")
    class MeanMLP(Reranker):
        def __init__(self, spec: ModelSpec):
            super().__init__(spec)
            self.out = torch.nn.Linear(self.item_dim + self.personal_dim, 1)

        def rank(self, x, personal):
            return self.out(torch.cat([x, personal.unsqueeze(1).expand(-1, x.shape[1], -1)], -1)).squeeze(-1)

    try:
        protocol, _ = ml100k
        lists = list_tensors(protocol.lists).subset(np.arange(8))
        model = build_recommender(RecommendConfig(backbone="mean-mlp-test", knowledge=False), protocol.items, lists)
        assert isinstance(model, MeanMLP) and model(lists.items, lists.history).shape == (8, 10)
    finally:
        MODELS.pop("mean-mlp-test")


def test_unknown_backbone_and_bad_config_are_input_errors():
    from dpo4rec.config import load_config
    from dpo4rec.errors import InputError

    with pytest.raises(InputError, match="unknown model 'nope'"):
        build_model(ModelSpec(backbone="nope", n_items=3, list_size=10, history_len=10))
    with pytest.raises(InputError, match="recommend.hidden_dim"):
        load_config(overrides={"recommend": {"hidden_dim": 63, "n_heads": 2}})
    with pytest.raises(InputError, match="encode.long_texts"):
        load_config(overrides={"encode": {"long_texts": "cut"}})


def test_knowledge_for_users_outside_the_data_is_an_input_error():
    from dpo4rec.errors import InputError

    with pytest.raises(InputError, match="user_index 12 is not a user"):
        user_knowledge(10, np.array([1, 12]), np.zeros((2, 4), np.float32))
