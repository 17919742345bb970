"""Domino (Eyuboglu et al., 2022): slice discovery with an error-aware mixture model.

Our own implementation of the model the paper describes, with the defaults of its dcbench
runs (25 mixture components, 5 returned slices, PCA to 128 dimensions, weight 10 on both
the label and the prediction likelihood). Every example i has a latent component s; given
s, its (PCA-reduced) embedding z_i is Gaussian with diagonal covariance, its label y_i
categorical with parameters p_s, and its soft prediction yhat_i categorical with
parameters phat_s. EM maximises

    sum_i log sum_s P(s) N(z_i; mu_s, diag(var_s)) P(y_i | s)^gamma (sum_c yhat_ic phat_sc)^gammahat

(the soft prediction enters as its expectation under the categorical, as in the paper).
Initialisation ("confusion"): every component is tied to one (label, prediction) cell of
the confusion matrix, responsibilities are the cell's mass plus uniform noise of scale
``confusion_noise``. Components are ranked by max_c (phat_sc - p_sc), the excess of
predicted over true probability, i.e. how erroneous the component is; the top
``n_slices`` are returned.

Where the reference package (domino 0.1.5) fails we do something defined and document it:
more classes than fit the confusion initialisation (C^2 > components) uses the most
populated cells; a PCA dimension above the data's rank is capped.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from harness.baselines.simple import SlicerInputs, _FittedCheck, check_inputs, check_positive_int
from harness.errors import InputError

_EPS = np.finfo(np.float64).eps


class DominoSlicer(_FittedCheck):
    """Domino's error-aware mixture model; scikit-learn style ``fit`` / ``predict_proba``.

    Parameters
    ----------
    n_slices : int
        Slices returned (the most erroneous mixture components).
    n_mixture_components : int
        Components of the mixture (Domino's k-bar).
    pca_dim : int or None
        PCA dimension of the embeddings before the mixture (``None``: no PCA). Capped at
        min(N, D) of the fit data.
    y_log_likelihood_weight, y_hat_log_likelihood_weight : float
        gamma and gamma-hat, the weights of the label and prediction log-likelihoods.
    max_iter : int
        EM iterations at most; EM stops earlier when the mean log-likelihood changes by
        less than ``tol``.
    seed : int
        Seeds the initialisation noise; same inputs and seed give the same slices.
    tol, reg_covar, confusion_noise : float
        Convergence tolerance, variance floor added to every variance, scale of the
        initialisation noise (scikit-learn's / domino's defaults).
    progress : bool
        Show a tqdm bar over EM iterations.
    """

    def __init__(
        self,
        n_slices: int = 5,
        n_mixture_components: int = 25,
        pca_dim: int | None = 128,
        y_log_likelihood_weight: float = 10.0,
        y_hat_log_likelihood_weight: float = 10.0,
        max_iter: int = 100,
        seed: int = 0,
        *,
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        confusion_noise: float = 1e-3,
        progress: bool = False,
    ):
        self.n_slices = check_positive_int("n_slices", n_slices)
        self.n_mixture_components = check_positive_int("n_mixture_components", n_mixture_components)
        if self.n_slices > self.n_mixture_components:
            raise InputError(
                f"n_slices ({n_slices}) > n_mixture_components ({n_mixture_components}): "
                "cannot return more slices than components"
            )
        self.pca_dim = None if pca_dim is None else check_positive_int("pca_dim", pca_dim)
        self.max_iter = check_positive_int("max_iter", max_iter)
        for name, value in (
            ("y_log_likelihood_weight", y_log_likelihood_weight),
            ("y_hat_log_likelihood_weight", y_hat_log_likelihood_weight),
            ("tol", tol),
            ("reg_covar", reg_covar),
            ("confusion_noise", confusion_noise),
        ):
            if not np.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0; got {value!r}")
        if reg_covar <= 0:
            raise InputError(f"reg_covar must be > 0 (it keeps variances positive); got {reg_covar!r}")
        self.y_log_likelihood_weight = float(y_log_likelihood_weight)
        self.y_hat_log_likelihood_weight = float(y_hat_log_likelihood_weight)
        self.seed = int(seed)
        self.tol = float(tol)
        self.reg_covar = float(reg_covar)
        self.confusion_noise = float(confusion_noise)
        self.progress = progress

    # ------------------------------------------------------------ fit
    def fit(self, embeddings, targets, pred_probs) -> "DominoSlicer":
        """EM on the fit (validation) data; sets the mixture parameters and ``slice_components_``.

        ``embeddings`` (N, D), ``targets`` (N,) class indices, ``pred_probs`` (N, C)
        probabilities (or (N,) for binary tasks).
        """
        inputs = check_inputs(embeddings, targets, pred_probs)
        n = inputs.embeddings.shape[0]
        if self.n_mixture_components > n:
            raise InputError(f"n_mixture_components ({self.n_mixture_components}) > number of examples ({n})")
        self.n_features_ = inputs.embeddings.shape[1]
        self.n_classes_ = inputs.n_classes
        self.pca_ = None
        if self.pca_dim is not None:
            # Exact SVD: deterministic, and the same components on every machine.
            self.pca_ = PCA(n_components=min(self.pca_dim, *inputs.embeddings.shape), svd_solver="full")
            self.pca_.fit(inputs.embeddings)
        z = self._reduce(inputs)
        labels = np.eye(self.n_classes_)[inputs.targets]
        predictions = inputs.pred_probs

        random_state = np.random.RandomState(self.seed)
        self._m_step(z, labels, predictions, self._confusion_init(labels, predictions, random_state))
        lower_bound = -np.inf
        self.converged_ = False
        bar = tqdm(range(1, self.max_iter + 1), desc="Domino EM", disable=not self.progress, leave=False)
        for iteration in bar:
            previous = lower_bound
            log_norm, log_resp = self._log_responsibilities(z, labels, predictions)
            self._m_step(z, labels, predictions, np.exp(log_resp))
            lower_bound = float(log_norm.mean())
            if abs(lower_bound - previous) < self.tol:
                self.converged_ = True
                break
        self.n_iter_ = iteration
        self.lower_bound_ = lower_bound

        error_excess = (self.y_hat_probs_ - self.y_probs_).max(axis=1)
        components = np.arange(self.n_mixture_components)
        self.component_error_ = error_excess
        self.slice_components_ = np.lexsort((components, -error_excess))[: self.n_slices]
        return self

    def _reduce(self, inputs: SlicerInputs) -> np.ndarray:
        return inputs.embeddings if self.pca_ is None else self.pca_.transform(inputs.embeddings)

    def _confusion_init(self, labels: np.ndarray, predictions: np.ndarray, random_state) -> np.ndarray:
        n, k, c = labels.shape[0], self.n_mixture_components, self.n_classes_
        cells = (labels[:, :, None] * predictions[:, None, :]).reshape(n, c * c)
        if k >= c * c:
            # Components cycle through the cells, so each cell gets floor or ceil(k / c^2).
            resp = cells[:, np.arange(k) % (c * c)]
        else:
            busiest = np.sort(np.argsort(-cells.sum(axis=0), kind="stable")[:k])
            resp = cells[:, busiest]
            resp[resp.sum(axis=1) == 0] = 1.0  # examples outside every kept cell start uniform
        resp = resp / resp.sum(axis=1, keepdims=True)
        resp = resp + random_state.rand(n, k) * self.confusion_noise
        return resp / resp.sum(axis=1, keepdims=True)

    def _m_step(self, z: np.ndarray, labels: np.ndarray, predictions: np.ndarray, resp: np.ndarray) -> None:
        mass = resp.sum(axis=0) + 10 * _EPS  # keeps empty components finite
        self.weights_ = mass / z.shape[0]
        weighted_sum = resp.T @ z
        self.means_ = weighted_sum / mass[:, None]
        self.variances_ = (
            (resp.T @ (z * z)) / mass[:, None]
            - 2 * self.means_ * weighted_sum / mass[:, None]
            + self.means_**2
            + self.reg_covar
        )
        self.y_probs_ = (resp.T @ labels) / mass[:, None]
        self.y_hat_probs_ = (resp.T @ predictions) / mass[:, None]

    def _log_responsibilities(self, z: np.ndarray, labels: np.ndarray, predictions: np.ndarray):
        precisions = 1.0 / self.variances_
        squared = (
            (z * z) @ precisions.T
            - 2 * z @ (self.means_ * precisions).T
            + (self.means_**2 * precisions).sum(axis=1)
        )
        log_gauss = -0.5 * (z.shape[1] * np.log(2 * np.pi) + squared) - 0.5 * np.log(self.variances_).sum(axis=1)
        joint = (
            log_gauss
            + np.log(self.weights_)
            + self.y_log_likelihood_weight * np.log(labels @ self.y_probs_.T + _EPS)
            + self.y_hat_log_likelihood_weight * np.log(predictions @ self.y_hat_probs_.T + _EPS)
        )
        log_norm = logsumexp(joint, axis=1)
        return log_norm, joint - log_norm[:, None]

    # ------------------------------------------------------------ predict
    def component_proba(self, embeddings, targets, pred_probs) -> np.ndarray:
        """(N, n_mixture_components) posterior P(component | embedding, label, prediction)."""
        inputs = self._check_predict_inputs(embeddings, targets, pred_probs, need_embeddings=True)
        labels = np.eye(self.n_classes_)[inputs.targets]
        _, log_resp = self._log_responsibilities(self._reduce(inputs), labels, inputs.pred_probs)
        return np.exp(log_resp)

    def predict_proba(self, embeddings, targets, pred_probs) -> np.ndarray:
        """(N, n_slices) posterior probability of each returned slice, most erroneous first."""
        return self.component_proba(embeddings, targets, pred_probs)[:, self.slice_components_]

    def predict(self, embeddings, targets, pred_probs) -> np.ndarray:
        """Every example's returned slice (its most likely component), or -1 when that component is not returned."""
        best = self.component_proba(embeddings, targets, pred_probs).argmax(axis=1)
        lookup = np.full(self.n_mixture_components, -1, dtype=np.int64)
        lookup[self.slice_components_] = np.arange(self.n_slices)
        return lookup[best]
