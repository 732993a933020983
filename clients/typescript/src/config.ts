/** Connection settings: the target, mutual TLS files, deadlines and read retries. */

/** The same variables as the Python client (clients/python/src/integrations_client/config.py). */
export const ENV_TARGET = "INTEGRATIONS_SERVICE_TARGET";
export const ENV_CA = "INTEGRATIONS_CLIENT_CA";
export const ENV_CERT = "INTEGRATIONS_CLIENT_CERT";
export const ENV_KEY = "INTEGRATIONS_CLIENT_KEY";

export const DEFAULT_TIMEOUT_MS = 2_000;

/** The client is configured wrongly (environment, TLS files); no call was made. */
export class ConfigurationError extends Error {
  override readonly name = "ConfigurationError";
}

/** Mutual TLS: the CA that signed the service's certificate, this client's certificate and key (PEM files). */
export interface TlsOptions {
  caFile: string;
  certFile: string;
  keyFile: string;
  /**
   * Check the service's certificate against this name instead of the target's host
   * (an address the certificate does not name, or tests).
   */
  serverName?: string;
}

/** Reads (ListProviders, GetProviderConfig) are retried on UNAVAILABLE; writes never are. */
export interface RetryOptions {
  /** Attempts in all, the first included (default 4; 1 turns retries off). */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
}

export const DEFAULT_RETRY: Readonly<RetryOptions> = Object.freeze({
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 1_000,
  multiplier: 2,
});

export interface ClientOptions {
  /** host:port of the service, e.g. "127.0.0.1:50051" or "integrations.internal:443". */
  target: string;
  /** Mutual TLS; plaintext (development only, to a loopback target) when absent. */
  tls?: TlsOptions;
  /**
   * DANGER: plaintext to a target that is not a loopback address (the client side of the service's
   * INTEGRATIONS_INSECURE_PLAINTEXT_ANY_ADDRESS). Without it, a client without `tls` refuses such a
   * target, so that TLS settings gone missing never send credentials in clear over the network.
   */
  insecurePlaintextAnyAddress?: boolean;
  /** Deadline of every call in milliseconds, retries included (default 2000); each method takes `timeoutMs` too. */
  timeoutMs?: number;
  retry?: Partial<RetryOptions>;
}

/** "http://host:port" or "https://host:port" from a host:port target. */
export function baseUrl(target: string, secure: boolean): string {
  const trimmed = target.trim();
  if (!trimmed || /^[a-z][a-z0-9+.-]*:\/\//i.test(trimmed) || /\s|\//.test(trimmed)) {
    throw new ConfigurationError(`target must be host:port, got ${JSON.stringify(target.slice(0, 200))}`);
  }
  const url = new URL(`${secure ? "https" : "http"}://${trimmed}`);
  if (!url.port) throw new ConfigurationError(`target ${JSON.stringify(trimmed)} names no port`);
  return url.origin;
}

/** 127.0.0.0/8, ::1 or localhost: what the service itself serves plaintext on. */
export function isLoopback(hostname: string): boolean {
  const host = hostname.toLowerCase();
  return host === "localhost" || host === "[::1]" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/**
 * ClientOptions from INTEGRATIONS_SERVICE_TARGET and INTEGRATIONS_CLIENT_CA/_CERT/_KEY:
 * mutual TLS when the three files are set, plaintext when none is, a ConfigurationError
 * naming the missing ones otherwise. An empty variable counts as unset.
 */
export function optionsFromEnv(env: Readonly<Record<string, string | undefined>> = process.env): ClientOptions {
  const read = (name: string): string => (env[name] ?? "").trim();
  const target = read(ENV_TARGET);
  if (!target) throw new ConfigurationError(`${ENV_TARGET} is not set (host:port of the integrations service)`);
  const files = { [ENV_CA]: read(ENV_CA), [ENV_CERT]: read(ENV_CERT), [ENV_KEY]: read(ENV_KEY) };
  const missing = Object.entries(files).filter(([, value]) => !value).map(([name]) => name);
  if (missing.length === 3) return { target };
  if (missing.length > 0) {
    throw new ConfigurationError(
      `${missing.join(", ")} ${missing.length === 1 ? "is" : "are"} not set: mutual TLS needs ` +
        `${ENV_CA}, ${ENV_CERT} and ${ENV_KEY} together (or none of them for plaintext)`,
    );
  }
  return { target, tls: { caFile: files[ENV_CA]!, certFile: files[ENV_CERT]!, keyFile: files[ENV_KEY]! } };
}
