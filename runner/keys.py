"""Typed keys for what the app and each request carry."""

from aiohttp import web

from runner.hardware import NVML as NVMLReader
from runner.live_runner import Registration
from runner.metrics import RunnerMetrics
from runner.offload import Offload
from runner.settings import RunnerSettings
from runner.state import RunnerState

SETTINGS = web.AppKey("settings", RunnerSettings)
STATE = web.AppKey("state", RunnerState)
NVML = web.AppKey("nvml", NVMLReader)
METRICS = web.AppKey("metrics", RunnerMetrics)
LIVE_RUNNER = web.AppKey("live_runner", Registration)
OFFLOAD = web.AppKey("offload", Offload)  # the runner's own worker thread, for large request bodies
REQUEST_ID = web.RequestKey("request_id", str)
