/** The dashboard backend's client: the calls the dashboard makes and the change stream, over gRPC (HTTP/2) with mutual TLS. */

import { EventEmitter } from "node:events";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type CallOptions as ConnectCallOptions, type Client } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  ConfigurationError,
  DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS,
  ENV_CA,
  ENV_CERT,
  ENV_KEY,
  baseUrl,
  isLoopback,
  optionsFromEnv,
  type ClientOptions,
  type RetryOptions,
} from "./config.js";
import { DeadlineExceededError, REQUEST_ID_KEY, UnavailableError, errorFrom, type IntegrationsError } from "./errors.js";
import * as pb from "./gen/integrations/v1/integrations_pb.js";
import {
  categoryNumber,
  plainConfig,
  plainProvider,
  plainWatchEvent,
  withoutMaskedValues,
  type Category,
  type Provider,
  type ProviderConfig,
  type WatchEvent,
} from "./models.js";
import { TlsFiles, type TlsMaterial } from "./tls.js";

export interface CallOptions {
  /** This call's deadline in milliseconds, retries included (default: the client's, 2000). */
  timeoutMs?: number;
  /** Aborts the call (e.g. the request of the server action went away). */
  signal?: AbortSignal;
  /** Sent as `x-request-id`: the service logs and audits the call under it. */
  requestId?: string;
}

export interface SaveOptions extends CallOptions {
  /** The etag last read: the save is refused with ConflictError when the credentials changed since. */
  etag?: string;
  /** Field keys to remove, so they fall back to the environment default. */
  clearFields?: readonly string[];
}

export interface DeleteOptions extends CallOptions {
  /** The etag last read: the delete is refused with ConflictError when the credentials changed since. */
  etag?: string;
  /** Deleting credentials that do not exist succeeds instead of throwing NotFoundError. */
  allowMissing?: boolean;
}

export interface WatchScope {
  /** Only this organization's changes; every organization when absent or "". */
  organizationId?: string | null;
  /** Only these provider ids (at most 16); every provider when absent or empty. */
  providers?: readonly string[];
}

/** A watch has no deadline: it runs until `signal` aborts, the client closes, or the service ends it. */
export interface WatchOptions {
  /** Ends the stream: the iteration stops, without an error. */
  signal?: AbortSignal;
  /** Sent as `x-request-id`: the service logs the stream under it. */
  requestId?: string;
}

// The server accepts keepalive pings every 20 s or more.
const PING_INTERVAL_MS = 30_000;
const PING_TIMEOUT_MS = 10_000;
// After a certificate rotation, calls in flight on the previous connection get this long to finish.
const RETIRE_AFTER_MS = 60_000;

export class IntegrationsClient {
  private readonly url: string;
  // ES private (#), so that console.log(client), util.inspect and JSON.stringify (a debugging
  // session, a logger given the client) never show the TLS key the connections are made with.
  readonly #tls: TlsFiles | undefined;
  #session!: Http2SessionManager;
  #rpc!: Client<typeof pb.IntegrationService>;
  readonly #retired = new Set<Http2SessionManager>();
  private readonly timeoutMs: number;
  private readonly retry: RetryOptions;
  private closed = false;
  /** Aborted by close(): wakes reads sleeping before a retry. */
  private readonly closing = new AbortController();

  /**
   * From INTEGRATIONS_SERVICE_TARGET and INTEGRATIONS_CLIENT_CA/_CERT/_KEY (the Python client's
   * variables): mutual TLS when the three files are set, plaintext when none is.
   */
  static fromEnv(
    env: Readonly<Record<string, string | undefined>> = process.env,
    overrides: Omit<ClientOptions, "target"> = {},
  ): IntegrationsClient {
    return new IntegrationsClient({ ...optionsFromEnv(env), ...overrides });
  }

  /**
   * Reads and checks the TLS files now (ConfigurationError naming what is wrong); connects on the
   * first call. The files are looked at again before calls (at most once a second): when they have
   * changed into a valid set, new connections use them, with no restart.
   */
  constructor(options: ClientOptions) {
    this.#tls = options.tls === undefined ? undefined : new TlsFiles(options.tls);
    this.url = baseUrl(options.target, this.#tls !== undefined);
    this.timeoutMs = milliseconds("timeoutMs", options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    positive("retry.maxAttempts", this.retry.maxAttempts);
    if (this.#tls === undefined && !options.insecurePlaintextAnyAddress && !isLoopback(new URL(this.url).hostname)) {
      // Plaintext sends every value as it is, before the service says anything: refuse rather than leak.
      throw new ConfigurationError(
        `target ${JSON.stringify(options.target.trim())} is not a loopback address: without tls the client talks ` +
          `plaintext only to 127.0.0.1, ::1 or localhost (set ${ENV_CA}, ${ENV_CERT} and ${ENV_KEY}, or the tls option)`,
      );
    }
    this.connectWith(this.#tls?.current);
  }

  /** The provider catalog in a stable order; with an organization id, each provider's `configured` and `ready`. */
  async listProviders(
    organizationId?: string | null,
    category?: Category | null,
    options: CallOptions = {},
  ): Promise<Provider[]> {
    const request = create(pb.ListProvidersRequestSchema, {
      organizationId: organizationId ?? "",
      category: category ? categoryNumber(category) : pb.Category.UNSPECIFIED,
    });
    const reply = await this.read(options, (call) => this.#rpc.listProviders(request, call));
    return reply.providers.map(plainProvider);
  }

  /**
   * The effective configuration with secrets masked (the organization's own "••••••••4242", the environment's
   * "••••••••" alone), and the etag to send back.
   */
  async getConfig(organizationId: string, provider: string, options: CallOptions = {}): Promise<ProviderConfig> {
    return this.getProviderConfig(organizationId, provider, pb.ConfigView.MASKED, options);
  }

  /**
   * The effective configuration in clear text. Only the commerce and admin roles may ask (the
   * dashboard's certificate gets PermissionDeniedError), every such read is audited, and its
   * result must never reach a browser.
   */
  async getDecryptedConfig(organizationId: string, provider: string, options: CallOptions = {}): Promise<ProviderConfig> {
    return this.getProviderConfig(organizationId, provider, pb.ConfigView.DECRYPTED, options);
  }

  /**
   * Sets `values` and removes `clearFields`; fields named in neither keep their stored value.
   * Values holding the mask character "•" (a masked value posted back unchanged) are dropped
   * first, so they keep the stored secret; when that leaves nothing to set or clear, nothing is
   * written and the current masked configuration is returned. Never retried. Returns the masked
   * configuration after the save, with its new etag.
   */
  async saveIntegration(
    organizationId: string,
    provider: string,
    values: Readonly<Record<string, string>>,
    options: SaveOptions = {},
  ): Promise<ProviderConfig> {
    for (const [key, value] of Object.entries(values)) {
      // protobuf-es would quietly send String(value); a form bug should fail loudly instead (never echoing the value).
      if (typeof value !== "string") {
        throw new TypeError(`values[${JSON.stringify(key.slice(0, 100))}] is a ${typeof value}, not a string`);
      }
    }
    const { values: kept, dropped } = withoutMaskedValues(values);
    const clearFields = [...(options.clearFields ?? [])];
    if (dropped.length > 0 && Object.keys(kept).length === 0 && clearFields.length === 0) {
      return this.getConfig(organizationId, provider, options);
    }
    const request = create(pb.SaveIntegrationRequestSchema, {
      organizationId,
      provider,
      values: kept,
      clearFields,
      etag: options.etag ?? "",
    });
    const reply = await this.write(options, (call) => this.#rpc.saveIntegration(request, call));
    return plainConfig(reply.config);
  }

  /** Removes the organization's stored credentials for the provider (every field falls back to the environment). Never retried. */
  async deleteIntegration(organizationId: string, provider: string, options: DeleteOptions = {}): Promise<void> {
    const request = create(pb.DeleteIntegrationRequestSchema, {
      organizationId,
      provider,
      allowMissing: options.allowMissing ?? false,
      etag: options.etag ?? "",
    });
    await this.write(options, (call) => this.#rpc.deleteIntegration(request, call));
  }

  /**
   * Committed changes of stored credentials within `scope`, as they commit: a `started` event
   * first (the subscription is live), then `changed` events (identifiers, etag, type, time; never
   * a value) and `resync` events (changes may have been missed: rebuild everything). Each
   * `for await` over the result opens its own stream; nothing is sent before that.
   *
   * It does not reconnect by itself: the stream's end is thrown as the client's error, as a
   * unary call's would be: `UnavailableError` when the service ends it (it is shutting down, or
   * lost its change feed) or the connection drops, `InvalidArgumentError` for a bad scope,
   * `PermissionDeniedError` for a role that may not watch. Iterate again (after a pause) to
   * resubscribe, and rebuild everything on its `started` event, since changes during the gap are
   * unknown. Aborting `signal`, breaking out of the loop or `close()` ends it without an error.
   */
  watchConfigChanges(scope: WatchScope = {}, options: WatchOptions = {}): AsyncIterable<WatchEvent> {
    const request = create(pb.WatchConfigChangesRequestSchema, {
      organizationId: scope.organizationId ?? "",
      providers: [...(scope.providers ?? [])],
    });
    return { [Symbol.asyncIterator]: () => this.watch(request, options) };
  }

  /** Closes the connection; calls made afterwards throw. */
  close(): void {
    this.closed = true;
    this.closing.abort();
    this.#session.abort();
    for (const session of this.#retired) session.abort();
    this.#retired.clear();
  }

  private connectWith(tls: TlsMaterial | undefined): void {
    const ping = { pingIntervalMs: PING_INTERVAL_MS, pingTimeoutMs: PING_TIMEOUT_MS };
    this.#session = guarded(new Http2SessionManager(this.url, ping, tls));
    this.#rpc = createClient(pb.IntegrationService, createGrpcTransport({ baseUrl: this.url, sessionManager: this.#session }));
  }

  /** Rotated TLS files: new calls go over a new connection made with them; the old one is retired. */
  private useRotatedTls(): void {
    const rotated = this.#tls?.reloaded();
    if (rotated === undefined) return;
    const previous = this.#session;
    this.connectWith(rotated);
    this.#retired.add(previous);
    setTimeout(() => {
      previous.abort();
      this.#retired.delete(previous);
    }, RETIRE_AFTER_MS).unref();
  }

  private async getProviderConfig(
    organizationId: string,
    provider: string,
    view: pb.ConfigView,
    options: CallOptions,
  ): Promise<ProviderConfig> {
    const request = create(pb.GetProviderConfigRequestSchema, { organizationId, provider, view });
    const reply = await this.read(options, (call) => this.#rpc.getProviderConfig(request, call));
    return plainConfig(reply.config);
  }

  private async *watch(request: pb.WatchConfigChangesRequest, options: WatchOptions): AsyncGenerator<WatchEvent> {
    if (this.closed) throw new ConfigurationError("the client is closed");
    const { signal } = options;
    if (signal?.aborted) return;
    this.useRotatedTls();
    // Our own controller, so that leaving the loop early (break, return, a throw in its body)
    // cancels the stream on the service too, not only an abort of the caller's signal.
    const ended = new AbortController();
    const end = (): void => ended.abort();
    signal?.addEventListener("abort", end, { once: true });
    const connect: ConnectCallOptions = { signal: ended.signal };
    if (options.requestId) connect.headers = { [REQUEST_ID_KEY]: options.requestId };
    let failure: IntegrationsError | undefined;
    try {
      for await (const reply of this.#rpc.watchConfigChanges(request, connect)) {
        const event = plainWatchEvent(reply);
        if (event !== undefined) yield event;
      }
      // The service never ends a watch with OK; a proxy closing it cleanly still leaves changes unknown.
      failure = new UnavailableError("the service ended the watch stream", "UNAVAILABLE", "");
    } catch (cause) {
      failure = errorFrom(transportError(cause, { signal: ended.signal }));
    } finally {
      signal?.removeEventListener("abort", end);
      // Ended by the caller (its signal) or by close() is a clean end, as documented.
      if (ended.signal.aborted || this.closed) failure = undefined;
      end();
    }
    if (failure) throw failure;
  }

  private async write<T>(options: CallOptions, call: (connect: ConnectCallOptions) => Promise<T>): Promise<T> {
    const connect = this.connectOptions(options, Date.now() + this.timeout(options));
    this.useRotatedTls();
    try {
      return await call(connect);
    } catch (error) {
      throw errorFrom(transportError(error, options));
    }
  }

  /** A read, retried on UNAVAILABLE with exponential backoff (and jitter) while the deadline allows. */
  private async read<T>(options: CallOptions, call: (connect: ConnectCallOptions) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.timeout(options);
    let backoff = this.retry.initialBackoffMs;
    for (let attempt = 1; ; attempt++) {
      const connect = this.connectOptions(options, deadline); // throws once the deadline has passed
      this.useRotatedTls();
      try {
        return await call(connect);
      } catch (cause) {
        // Cut short by close(), or failed while it was closing: no retry, the same error as a call made now.
        if (this.closed) throw new ConfigurationError("the client is closed");
        const error = transportError(cause, options);
        const pause = backoff * (0.8 + Math.random() * 0.4);
        const retryable = error.code === Code.Unavailable;
        if (!retryable || attempt >= this.retry.maxAttempts || Date.now() + pause >= deadline) throw errorFrom(error);
        await sleep(pause, [options.signal, this.closing.signal]);
        // Closed during the pause: no new connection; the read ends as a call made now would.
        if (this.closed) throw new ConfigurationError("the client is closed");
        backoff = Math.min(backoff * this.retry.multiplier, this.retry.maxBackoffMs);
      }
    }
  }

  private timeout(options: CallOptions): number {
    if (this.closed) throw new ConfigurationError("the client is closed");
    return options.timeoutMs === undefined ? this.timeoutMs : milliseconds("timeoutMs", options.timeoutMs);
  }

  private connectOptions(options: CallOptions, deadline: number): ConnectCallOptions {
    const remaining = Math.floor(deadline - Date.now());
    if (remaining <= 0) throw new DeadlineExceededError("the deadline passed before the call", "DEADLINE_EXCEEDED", "");
    const connect: ConnectCallOptions = { timeoutMs: remaining };
    if (options.signal) connect.signal = options.signal;
    if (options.requestId) connect.headers = { [REQUEST_ID_KEY]: options.requestId };
    return connect;
  }
}

/**
 * `manager`, with a listener of ours on the 'error' event of every HTTP/2 session it opens.
 * connect-node (2.1) takes its own listener off a session when it moves on from it (a call made,
 * or close(), right after a connection error such as an HTTP/2 protocol error), while Node has yet to emit that error on it: unhandled, that 'error' ends the
 * whole process (the dashboard's server). The calls on that session fail as they would anyway.
 */
function guarded(manager: Http2SessionManager): Http2SessionManager {
  const internal = manager as unknown as { setState?: (state: { t?: string; conn?: unknown }) => void };
  const setState = internal.setState;
  if (typeof setState !== "function") throw new TypeError("@connectrpc/connect-node: Http2SessionManager has no setState()");
  internal.setState = function (this: unknown, state) {
    if (state.t === "ready" && state.conn instanceof EventEmitter) state.conn.on("error", ignoreError);
    setState.call(manager, state);
  };
  return manager;
}

function ignoreError(): void {}

/**
 * connect-node reports a connection that closed before the answer (a service restarting, a proxy
 * dropping it) as CANCELLED, one that was reset (ECONNRESET) as ABORTED, and one that broke with an
 * HTTP/2 connection error as INTERNAL; gRPC calls all three UNAVAILABLE, and so do we, unless the
 * caller aborted. ABORTED is only ever the service's own
 * status (a stale etag: ConflictError), which comes with a grpc-status; a reset carries none.
 */
function transportError(cause: unknown, options: CallOptions): ConnectError {
  const error = ConnectError.from(cause);
  const dropped =
    (error.code === Code.Canceled && !options.signal?.aborted) ||
    (error.code === Code.Aborted && !error.metadata.has("grpc-status")) ||
    (error.code === Code.Internal && !error.metadata.has("grpc-status") && connectionFailed(error));
  if (!dropped) return error;
  return new ConnectError(error.rawMessage, Code.Unavailable, error.metadata, undefined, error);
}

// Node's errors of a whole HTTP/2 connection (not of one stream): gRPC says UNAVAILABLE for those.
const CONNECTION_ERRORS = new Set(["ERR_HTTP2_ERROR", "ERR_HTTP2_SESSION_ERROR", "ERR_HTTP2_GOAWAY_SESSION", "ERR_HTTP2_INVALID_SESSION"]);

/** connect-node says INTERNAL for a connection that broke with an HTTP/2 error (a protocol error, a GOAWAY with an error code). */
function connectionFailed(error: ConnectError): boolean {
  const seen = new Set<unknown>();
  for (let cause: unknown = error.cause; cause instanceof Error && !seen.has(cause); cause = cause.cause) {
    seen.add(cause);
    const { code } = cause as { code?: unknown };
    if (typeof code === "string" && CONNECTION_ERRORS.has(code)) return true;
  }
  return false;
}

function positive(name: string, value: number): number {
  if (!Number.isFinite(value) || value <= 0) throw new ConfigurationError(`${name} must be a positive number, got ${value}`);
  return value;
}

// Node's timers (and so the deadlines) hold at most this; a longer one fires at once.
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

function milliseconds(name: string, value: number): number {
  if (!Number.isFinite(value) || value <= 0 || value > MAX_TIMEOUT_MS) {
    throw new ConfigurationError(`${name} must be a positive number of milliseconds up to ${MAX_TIMEOUT_MS}, got ${value}`);
  }
  return value;
}

/** Resolves after `ms`, or as soon as one of `signals` aborts. */
function sleep(ms: number, signals: ReadonlyArray<AbortSignal | undefined>): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    for (const signal of signals) signal?.addEventListener("abort", done, { once: true });
    if (signals.some((signal) => signal?.aborted)) done();
    function done(): void {
      clearTimeout(timer);
      for (const signal of signals) signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
