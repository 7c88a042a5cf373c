//! Where settings are looked up, and secrets that never print.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{ConfigError, Setting, DEFAULT_ENV_FILE};

/// A value that must never be printed: `Debug`/`Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must hand it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The `--env-file` flag both commands take: where [`Env::load`] reads settings from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EnvFile {
    /// Load settings from this file instead of config/.env (the environment still wins).
    #[arg(long = "env-file", global = true, value_name = "PATH")]
    path: Option<PathBuf>,
}

impl EnvFile {
    /// The process environment after loading the named file (or `config/.env`).
    pub fn load(&self) -> Result<Env, ConfigError> {
        Env::load(self.path.as_deref())
    }
}

/// Where settings are looked up: the process environment, or a fixed map (tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    fixed: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment, after loading `env_file` (or `config/.env` if present).
    ///
    /// An explicitly named file must exist; the default one is optional. Variables already set in
    /// the environment are not overridden by the file.
    pub fn load(env_file: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match env_file {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_ENV_FILE), false),
        };
        if required || path.exists() {
            dotenvy::from_path(&path).map_err(|e| ConfigError::EnvFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self { fixed: None })
    }

    /// A fixed set of variables, ignoring the process environment.
    pub fn from_map<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            fixed: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    fn raw(&self, name: &str) -> Option<String> {
        match &self.fixed {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// A plain setting; empty counts as unset.
    pub fn optional(&self, setting: Setting) -> Option<String> {
        self.raw(setting.name()).filter(|v| !v.is_empty())
    }

    pub fn required(&self, setting: Setting) -> Result<String, ConfigError> {
        self.optional(setting)
            .ok_or(ConfigError::Missing(setting.name()))
    }

    /// A setting that may also be given as `NAME_FILE` (a path whose content is the value; one
    /// trailing newline is removed).
    pub fn optional_secret(&self, setting: Setting) -> Result<Option<Secret>, ConfigError> {
        let name = setting.name();
        let file_var = format!("{name}_FILE");
        let direct = self.optional(setting);
        let file = self.raw(&file_var).filter(|v| !v.is_empty());
        match (direct, file) {
            (Some(_), Some(_)) => Err(ConfigError::Ambiguous(name)),
            (Some(v), None) => Ok(Some(Secret(v))),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let mut value = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::SecretFile { name, path, source })?;
                if value.ends_with('\n') {
                    value.pop();
                    if value.ends_with('\r') {
                        value.pop();
                    }
                }
                Ok(Some(Secret(value)))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn required_secret(&self, setting: Setting) -> Result<Secret, ConfigError> {
        self.optional_secret(setting)?
            .ok_or(ConfigError::Missing(setting.name()))
    }

    pub(crate) fn parsed<T>(&self, setting: Setting, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let name = setting.name();
        match self.optional(setting) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: format!("{v:?}: {e}"),
            }),
        }
    }

    pub(crate) fn flag(&self, setting: Setting, default: bool) -> Result<bool, ConfigError> {
        let name = setting.name();
        match self.optional(setting).as_deref().map(str::trim) {
            None => Ok(default),
            Some(v)
                if v.eq_ignore_ascii_case("true") || v == "1" || v.eq_ignore_ascii_case("yes") =>
            {
                Ok(true)
            }
            Some(v)
                if v.eq_ignore_ascii_case("false") || v == "0" || v.eq_ignore_ascii_case("no") =>
            {
                Ok(false)
            }
            Some(v) => Err(ConfigError::Invalid {
                name,
                reason: format!("{v:?} is not true or false"),
            }),
        }
    }
}
