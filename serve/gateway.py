"""The HTTP ingress: a Serve deployment of the FastAPI app (serve/api.py) whose routes are the
mixins of serve/routes/, by what they serve. Its state, set here, is what they share: the config,
the store, auth, the base, the media decoder and the client of the model replicas.

No `from __future__ import annotations` in the route modules: FastAPI must see the real `Request`
type through Serve's class-based routes.
"""

import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from ddft import config as ddft_config
from ddft.models.info import BaseInfo, base_spec
from ddft.store import Store
from serve import bodies
from serve.api import api, openapi
from serve.auth import Auth
from serve.decoder import Decoder
from serve.replicas import Replicas
from serve.routes.adapters import AdapterRoutes
from serve.routes.inference import InferenceRoutes
from serve.routes.operations import OperationRoutes
from serve.routes.tenants import TenantRoutes

GATEWAY_CPUS = 0.25


@serve.deployment(ray_actor_options={"num_cpus": GATEWAY_CPUS}, max_ongoing_requests=256)
@serve.ingress(api)
class Gateway(InferenceRoutes, AdapterRoutes, TenantRoutes, OperationRoutes):
    def __init__(
        self,
        model: DeploymentHandle,
        cfg: ddft_config.ServeConfig,
        store: Store,
        admin_key_sha256: str | None = None,
    ):
        self.cfg, self.store, self.s = cfg, store, cfg.serve
        openapi(self.s)  # /openapi.json states this config's limits
        self.base_id = cfg.base.id
        self.limits = bodies.Limits(self.s.max_new_tokens, self.s.max_n, self.base_id)  # what bodies may ask
        self.auth = Auth(store, admin_key_sha256)
        self.spec = base_spec(store, self.base_id)  # the base's LM modules: what an upload may target
        self.base = BaseInfo(self.base_id, self.spec.fingerprint, "")
        self.started = int(time.time())  # the base's `created` on /v1/models: served since
        self.replicas = Replicas(model, self.s.request_timeout_s)
        self.decode = Decoder()
        self.decode.warm()
        self._resolved: dict[tuple, tuple[float, object]] = {}  # (modality, tenant, ref) -> (when, manifest)
