import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, kmeans_slices, rule_slices, slice_opponents, summarize_slices
from harness.train import TrainConfig, predict, train_model

x, y = load_digits(return_X_y=True)  # real 8x8 digits shipped with scikit-learn
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
train_set, test_set = TensorDataset(x[:1200], y[:1200]), TensorDataset(x[1200:], y[1200:])
train = DataLoader(train_set, batch_size=256)  # keep order: embeddings come back in loader order
test = DataLoader(test_set, batch_size=256)

model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
train_model(model, DataLoader(train_set, batch_size=64, shuffle=True), TrainConfig(epochs=15, lr=1e-2, seed=0))

embedder = InfluenceEmbedder(model, layers=["2"], arnoldi_dim=100, embedding_dim=20, seed=0).fit(train)
mu_train, mu_test = embedder.transform(train), embedder.transform(test)
pred = predict(model, test)
print(f"test accuracy {pred.accuracy:.3f}, {(~pred.correct).sum()} errors; influence of train 0 on test 0: {mu_train[0] @ mu_test[0]:.4f}")

slice_ids, distance = kmeans_slices(mu_test, n_slices=10, seed=0)  # InfEmbed
table = summarize_slices(slice_ids, mu_test, pred.targets, pred.predicted)
print(table[["slice", "size", "accuracy", "top_label", "top_prediction", "nearest"]].head(3).to_string())

worst = table.iloc[0]
opponents, scores = slice_opponents(mu_train, mu_test[worst.members], k=5)  # most harmful training examples
print("opponents of the worst slice:", opponents.tolist(), "their labels:", y[opponents].tolist())

rule, tree = rule_slices(mu_test, pred.correct, max_accuracy=0.5, min_size=5, branching=3, max_depth=6, seed=0)
print(f"InfEmbed-Rule: {len(rule)} slices with accuracy <= 50% and >= 5 examples: {[len(s) for s in rule]}")
