//! What every settings group is: a clap `Args` and serde struct declared once with
//! `settings_group!`, layered over the file's values where no flag or variable was given.

use super::*;

/// A settings group: clap gives its flags and environment, serde its file keys.
pub trait Group: Args + FromArgMatches + DeserializeOwned + Default + Clone {
    /// Takes `file`'s value for every setting not given as a flag or variable.
    fn layer(&mut self, file: Self, explicit: &dyn Fn(&str) -> bool);

    /// The group's file keys: its long flag names.
    fn keys() -> Vec<String> {
        Self::augment_args(clap::Command::new("keys"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }
}

/// A group's defaults are what clap gives with no flags and no environment.
pub(super) fn defaults<G: Args + FromArgMatches>() -> G {
    let cmd = G::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.try_get_matches_from(Vec::<OsString>::new());
    // Only a malformed `default_value` gets here: a bug the `defaults` test catches.
    #[allow(clippy::expect_used)]
    matches
        .and_then(|m| G::from_arg_matches(&m))
        .expect("the settings' defaults parse")
}

/// Declares a settings group: the struct (each field one setting, its flag, help and
/// default in clap's attributes; its file key the long flag name) and the layering that
/// picks, per field, the flag or variable if given, else the file's value.
macro_rules! settings_group {
    ($(#[$attr:meta])* pub struct $name:ident {
        $($(#[$fattr:meta])* pub $field:ident: $ty:ty,)*
    }) => {
        #[derive(Clone, Debug, PartialEq, Eq, Args, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
        $(#[$attr])*
        pub struct $name {
            $($(#[$fattr])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                defaults()
            }
        }

        impl Group for $name {
            fn layer(&mut self, file: Self, explicit: &dyn Fn(&str) -> bool) {
                $(if !explicit(stringify!($field)) {
                    self.$field = file.$field;
                })*
            }
        }
    };
}
