export { IntegrationsClient, type CallOptions, type DeleteOptions, type SaveOptions } from "./client.js";
export {
  ConfigurationError,
  DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS,
  ENV_CA,
  ENV_CERT,
  ENV_KEY,
  ENV_TARGET,
  optionsFromEnv,
  type ClientOptions,
  type RetryOptions,
  type TlsOptions,
} from "./config.js";
export {
  ConflictError,
  DataLossError,
  DeadlineExceededError,
  IntegrationsError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  UnavailableError,
  errorFrom,
  type FieldViolation,
  type IntegrationsErrorJson,
  type ResourceInfo,
  type StatusName,
} from "./errors.js";
export {
  MASK_CHARACTER,
  withoutMaskedValues,
  type Category,
  type ConfigValue,
  type Provider,
  type ProviderConfig,
  type ProviderField,
  type ValueSource,
} from "./models.js";
