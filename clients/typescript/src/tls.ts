/**
 * The client's TLS files, re-read when they change: certificate managers (cert-manager, SPIRE)
 * replace short-lived certificates on disk, and a client that read them once fails every new
 * connection after the old certificate expires.
 */

import { X509Certificate, createPrivateKey, type KeyObject } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { createSecureContext } from "node:tls";

import { ConfigurationError, type TlsOptions } from "./config.js";

/** What node:http2's connect() takes for mutual TLS. */
export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  servername?: string;
}

// Looking at three files' metadata costs microseconds; once a second is plenty for rotations.
const CHECK_EVERY_MS = 1_000;

export class TlsFiles {
  current: TlsMaterial;
  private accepted: string;
  private attempted: string;
  private checkedAt = 0;

  /** Reads and checks the files now: a ConfigurationError names the one that is wrong. */
  constructor(private readonly options: TlsOptions) {
    // Stamped before reading, so that a change made during the read is seen by the next check.
    this.accepted = this.attempted = this.stamp();
    this.current = this.read();
  }

  /**
   * New material when the files changed (at most one look per second) and form a valid set again;
   * undefined otherwise. A set that is not valid (a half-finished rotation, a broken file) is not
   * used: the previous one stays, a process warning says why, and it is tried again once the files
   * change again.
   */
  reloaded(now: number = Date.now()): TlsMaterial | undefined {
    if (now - this.checkedAt < CHECK_EVERY_MS) return undefined;
    this.checkedAt = now;
    const stamp = this.stamp();
    if (stamp === this.accepted || stamp === this.attempted) return undefined;
    this.attempted = stamp;
    try {
      this.current = this.read();
    } catch (error) {
      process.emitWarning(`integrations client: keeping the previous TLS files: ${(error as Error).message}`, {
        code: "INTEGRATIONS_TLS_RELOAD",
      });
      return undefined;
    }
    this.accepted = stamp;
    return this.current;
  }

  private stamp(): string {
    return [this.options.caFile, this.options.certFile, this.options.keyFile]
      .map((path) => {
        try {
          const stat = statSync(path);
          return `${stat.dev}:${stat.ino}:${stat.size}:${stat.mtimeMs}`;
        } catch {
          return "unreadable";
        }
      })
      .join("|");
  }

  private read(): TlsMaterial {
    const { caFile, certFile, keyFile } = this.options;
    const material: TlsMaterial = {
      ca: readPem("caFile", caFile),
      cert: readPem("certFile", certFile),
      key: readPem("keyFile", keyFile),
    };
    // Each file on its own first, so that the error names the wrong one (a CA file without a
    // certificate would otherwise pass here and fail every handshake later).
    certificate("caFile", caFile, material.ca);
    const certificateOfClient = certificate("certFile", certFile, material.cert);
    let key: KeyObject;
    try {
      key = createPrivateKey(material.key);
    } catch (error) {
      throw new ConfigurationError(`tls.keyFile: ${JSON.stringify(keyFile)} holds no usable PEM private key (${reason(error)})`);
    }
    if (!certificateOfClient.checkPrivateKey(key)) {
      throw new ConfigurationError(
        `tls: the files do not form a valid set: the key in tls.keyFile ${JSON.stringify(keyFile)} ` +
          `is not the certificate's (tls.certFile ${JSON.stringify(certFile)})`,
      );
    }
    try {
      // What node:http2 will do with them.
      createSecureContext({ ca: material.ca, cert: material.cert, key: material.key });
    } catch (error) {
      throw new ConfigurationError(`tls: the CA, certificate and key files do not form a valid set (${reason(error)})`);
    }
    if (this.options.serverName) material.servername = this.options.serverName;
    return material;
  }
}

function readPem(option: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    throw new ConfigurationError(`tls.${option}: cannot read ${JSON.stringify(path)} (${reason(error)})`);
  }
}

function certificate(option: string, path: string, pem: Buffer): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (error) {
    throw new ConfigurationError(`tls.${option}: ${JSON.stringify(path)} holds no PEM certificate (${reason(error)})`);
  }
}

/** The error's code (ENOENT, ERR_OSSL_...); its message only when it has none. */
function reason(error: unknown): string {
  const { code, message } = error as { code?: string; message?: string };
  return code ?? message ?? "unknown error";
}
