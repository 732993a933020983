/**
 * One error class per gRPC status the service answers with, built in one place (`errorFrom`)
 * from the call's ConnectError and its rich status details (google.rpc.BadRequest, ResourceInfo,
 * RequestInfo in `grpc-status-details-bin`). Messages come from the service, which never puts a
 * credential value in them.
 */

import { Code, ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  RequestInfoSchema,
  ResourceInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

export const REQUEST_ID_KEY = "x-request-id";

/** gRPC status names as the service documents them (docs/api.md). */
export type StatusName =
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

export interface FieldViolation {
  /** e.g. "values.secretKey", "organization_id", "clear_fields[0]". */
  field: string;
  description: string;
}

export interface ResourceInfo {
  /** "integrations.v1.Provider" or "integrations.v1.Integration". */
  resourceType: string;
  /** The provider id, or "organizations/<organization>/integrations/<provider>". */
  resourceName: string;
  owner: string;
  description: string;
}

/** What `toJSON()` gives: safe to return from a server action and show in the UI. */
export interface IntegrationsErrorJson {
  name: string;
  code: StatusName;
  message: string;
  requestId: string;
  fieldViolations?: FieldViolation[];
  resource?: ResourceInfo;
}

interface Details {
  requestId: string;
  fieldViolations: FieldViolation[];
  resource: ResourceInfo | undefined;
}

/** Base of every error a call to the service throws. */
export class IntegrationsError extends Error {
  override name = "IntegrationsError";
  /** The gRPC status, e.g. "NOT_FOUND". */
  readonly code: StatusName;
  /** The id under which the service logged the call; "" when the call never reached it. */
  readonly requestId: string;

  constructor(message: string, code: StatusName, requestId: string, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.code = code;
    this.requestId = requestId;
  }

  override toString(): string {
    const text = `${this.name} ${this.code}: ${this.message}`;
    return this.requestId ? `${text} (request id ${this.requestId})` : text;
  }

  toJSON(): IntegrationsErrorJson {
    return { name: this.name, code: this.code, message: this.message, requestId: this.requestId };
  }
}

/** INVALID_ARGUMENT: the request is malformed; `fieldViolations` names each bad field. */
export class InvalidArgumentError extends IntegrationsError {
  override name = "InvalidArgumentError";
  readonly fieldViolations: FieldViolation[];

  constructor(message: string, requestId: string, fieldViolations: FieldViolation[], cause?: unknown) {
    super(message, "INVALID_ARGUMENT", requestId, cause);
    this.fieldViolations = fieldViolations;
  }

  /** The violations keyed by form field: "values.secretKey" becomes "secretKey". */
  byFormField(): Record<string, string> {
    const messages: Record<string, string> = {};
    for (const { field, description } of this.fieldViolations) {
      const key = field.startsWith("values.") ? field.slice("values.".length) : field;
      const text = key in messages ? `${messages[key]}; ${description}` : description;
      Object.defineProperty(messages, key, { value: text, enumerable: true, writable: true, configurable: true });
    }
    return messages;
  }

  override toJSON(): IntegrationsErrorJson {
    return { ...super.toJSON(), fieldViolations: this.fieldViolations.map((v) => ({ ...v })) };
  }
}

/** NOT_FOUND: unknown provider, or deleting credentials that do not exist; `resource` says which. */
export class NotFoundError extends IntegrationsError {
  override name = "NotFoundError";
  readonly resource: ResourceInfo | undefined;

  constructor(message: string, requestId: string, resource: ResourceInfo | undefined, cause?: unknown) {
    super(message, "NOT_FOUND", requestId, cause);
    this.resource = resource;
  }

  override toJSON(): IntegrationsErrorJson {
    const json = super.toJSON();
    return this.resource ? { ...json, resource: { ...this.resource } } : json;
  }
}

/** ABORTED: the etag is stale; the credentials changed (or were deleted) since they were read. */
export class ConflictError extends IntegrationsError {
  override name = "ConflictError";
}

/** PERMISSION_DENIED: the caller's role does not allow this call or view. */
export class PermissionDeniedError extends IntegrationsError {
  override name = "PermissionDeniedError";
}

/** UNAVAILABLE: the service or its store cannot be reached (reads were already retried). */
export class UnavailableError extends IntegrationsError {
  override name = "UnavailableError";
}

/** DATA_LOSS: a stored value cannot be decrypted; saving new values for those fields repairs the row. */
export class DataLossError extends IntegrationsError {
  override name = "DataLossError";
}

/** DEADLINE_EXCEEDED: no answer within the call's deadline (retries included). */
export class DeadlineExceededError extends IntegrationsError {
  override name = "DeadlineExceededError";
}

const STATUS_NAMES: Record<Code, StatusName> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

function details(error: ConnectError): Details {
  const [requestInfo] = error.findDetails(RequestInfoSchema);
  const [badRequest] = error.findDetails(BadRequestSchema);
  const [resource] = error.findDetails(ResourceInfoSchema);
  return {
    requestId: requestInfo?.requestId || (error.metadata.get(REQUEST_ID_KEY) ?? ""),
    fieldViolations: (badRequest?.fieldViolations ?? []).map(({ field, description }) => ({ field, description })),
    resource: resource && {
      resourceType: resource.resourceType,
      resourceName: resource.resourceName,
      owner: resource.owner,
      description: resource.description,
    },
  };
}

/** The one mapping from a failed call to an error class. */
export function errorFrom(cause: unknown): IntegrationsError {
  if (cause instanceof IntegrationsError) return cause;
  const error = ConnectError.from(cause);
  const { requestId, fieldViolations, resource } = details(error);
  const message = error.rawMessage;
  switch (error.code) {
    case Code.InvalidArgument:
      return new InvalidArgumentError(message, requestId, fieldViolations, error);
    case Code.NotFound:
      return new NotFoundError(message, requestId, resource, error);
    case Code.Aborted:
      return new ConflictError(message, "ABORTED", requestId, error);
    case Code.PermissionDenied:
      return new PermissionDeniedError(message, "PERMISSION_DENIED", requestId, error);
    case Code.Unavailable:
      return new UnavailableError(message, "UNAVAILABLE", requestId, error);
    case Code.DataLoss:
      return new DataLossError(message, "DATA_LOSS", requestId, error);
    case Code.DeadlineExceeded:
      return new DeadlineExceededError(message, "DEADLINE_EXCEEDED", requestId, error);
    default:
      return new IntegrationsError(message, STATUS_NAMES[error.code] ?? "UNKNOWN", requestId, error);
  }
}
