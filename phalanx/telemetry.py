"""OpenTelemetry set-up that stays off the global providers.

Exporters follow the standard variables: `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER`
(`console`, `otlp` or `none`), and `OTEL_EXPORTER_OTLP_ENDPOINT` (or the signal-specific
endpoint variables), which selects OTLP over gRPC when no exporter is named. With nothing set,
spans and metrics are recorded but not exported. `OTEL_SERVICE_NAME` overrides the default
service name. Tests pass their own in-memory exporter and reader instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter

INSTRUMENTATION_NAME = "phalanx"


def _exporter_choice(signal: str) -> str:
    """`console`, `otlp` or `none` for a signal ("traces" or "metrics")."""
    named = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if named:
        return named
    endpoint_vars = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return "otlp" if any(os.environ.get(v) for v in endpoint_vars) else "none"


def _span_exporter_from_env() -> SpanExporter | None:
    choice = _exporter_choice("traces")
    if choice == "console":
        return ConsoleSpanExporter()
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if choice != "none":
        raise ValueError(f"OTEL_TRACES_EXPORTER={choice!r} is not supported; use console, otlp or none")
    return None


def _metric_reader_from_env() -> MetricReader | None:
    choice = _exporter_choice("metrics")
    if choice == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return PeriodicExportingMetricReader(OTLPMetricExporter())
    if choice != "none":
        raise ValueError(f"OTEL_METRICS_EXPORTER={choice!r} is not supported; use console, otlp or none")
    return None


@dataclass
class Telemetry:
    """A tracer and meter provider pair for one process or one component under test."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def create(
        cls,
        default_service_name: str,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] | None = None,
        attributes: dict[str, str | int] | None = None,
    ) -> Telemetry:
        """Providers for `default_service_name`; exporters from the arguments, else from the environment."""
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or default_service_name, **(attributes or {})}
        )
        tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        elif (exporter := _span_exporter_from_env()) is not None:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        if metric_readers is None:
            reader = _metric_reader_from_env()
            metric_readers = [reader] if reader is not None else []
        meter_provider = MeterProvider(resource=resource, metric_readers=list(metric_readers))
        return cls(tracer_provider, meter_provider)

    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer(INSTRUMENTATION_NAME)

    def meter(self) -> Meter:
        return self.meter_provider.get_meter(INSTRUMENTATION_NAME)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The OpenTelemetry interceptor, to be first (outermost) in a server's list."""
        return [aio_server_interceptor(tracer_provider=self.tracer_provider)]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Interceptors that open client spans and inject `traceparent` into call metadata."""
        return list(aio_client_interceptors(tracer_provider=self.tracer_provider))

    def shutdown(self) -> None:
        """Flush and stop both providers; spans still batched are exported first."""
        if self._closed:
            return
        self._closed = True
        self.tracer_provider.force_flush()
        self.tracer_provider.shutdown()
        self.meter_provider.force_flush()
        self.meter_provider.shutdown()
