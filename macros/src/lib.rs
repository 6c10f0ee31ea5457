//! `#[derive(Row)]`: a struct becomes a row of a materialised table, its schema and
//! conversions generated from its fields, so the column order of the schema and of the
//! values can never disagree.
//!
//! Use it through `flows` (or `flows-core`), which re-export it beside the `Row` trait:
//!
//! ```
//! use flows_core::{ColumnType, Row};
//!
//! #[derive(Row)]
//! #[flows(table = "word_counts")]
//! struct WordCount {
//!     #[flows(key)]
//!     word: String,
//!     count: i64,
//!     #[flows(rename = "seen_at")]
//!     last_seen: Option<chrono::DateTime<chrono::Utc>>,
//!     #[flows(json)]
//!     tags: Vec<String>,
//! }
//!
//! let schema = WordCount::schema();
//! assert_eq!(schema.table().as_str(), "word_counts");
//! assert_eq!(schema.columns()[2].name.as_str(), "seen_at");
//! assert_eq!(schema.columns()[3].column_type, ColumnType::Json);
//! ```
//!
//! | attribute | on | meaning |
//! |---|---|---|
//! | `table = "name"` | struct | the table's default name (else the struct's name in snake case) |
//! | `crate = "path"` | struct | where the `Row` trait lives, when neither `flows` nor `flows-core` is a dependency by that name |
//! | `key` | field | part of the primary key (several make a composite key, in field order) |
//! | `rename = "column"` | field | the column's name (else the field's) |
//! | `json` | field | stored as a JSON column through serde (`Option<T>`: nullable) |
//! | `skip` | field | not a column; `Default::default()` when read back |
//!
//! Every field is a column of the type its Rust type maps to (`ColumnValue`: `bool`,
//! `i64`, `i32`, `f64`, `String`, `Vec<u8>`, `DateTime<Utc>`, `serde_json::Value`, and
//! `Option` of any of them for a nullable column). Checked when the program compiles:
//! table and column names (an ASCII letter, then letters, digits and underscores, at
//! most 48), no column twice, at least one key, keys neither optional nor of an inexact
//! type (floats, JSON).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitStr, Type, parse_macro_input};

/// Derives `Row` for a struct with named fields; see the crate documentation.
#[proc_macro_derive(Row, attributes(flows))]
pub fn derive_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// One field as a column.
struct ColumnField<'a> {
    ident: &'a syn::Ident,
    ty: &'a Type,
    column: LitStr,
    key: bool,
    json: bool,
}

/// The struct-level settings.
struct Settings {
    table: LitStr,
    krate: TokenStream2,
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let name = &input.ident;
    let settings = settings(input)?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            name.span(),
            "derive(Row) needs a struct with named fields: each field is a column",
        ));
    };
    let Fields::Named(named) = &data.fields else {
        return Err(syn::Error::new(
            data.fields.span(),
            "derive(Row) needs named fields: each field's name is its column's",
        ));
    };
    let mut columns = Vec::new();
    let mut skipped = Vec::new();
    for field in &named.named {
        let ident = field
            .ident
            .as_ref()
            .ok_or_else(|| syn::Error::new(field.span(), "derive(Row) needs named fields"))?;
        let mut column = LitStr::new(&ident.to_string(), ident.span());
        let (mut key, mut json, mut skip) = (false, false, false);
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("flows")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    key = true;
                } else if meta.path.is_ident("json") {
                    json = true;
                } else if meta.path.is_ident("skip") {
                    skip = true;
                } else if meta.path.is_ident("rename") {
                    column = meta.value()?.parse()?;
                } else {
                    return Err(meta.error(
                        "unknown field attribute: expected `key`, `rename = \"…\"`, `json` or `skip`",
                    ));
                }
                Ok(())
            })?;
        }
        if skip {
            if key || json {
                return Err(syn::Error::new(
                    ident.span(),
                    "a skipped field is not a column: it cannot also be `key` or `json`",
                ));
            }
            skipped.push(ident);
            continue;
        }
        if key && json {
            return Err(syn::Error::new(
                ident.span(),
                "a JSON column cannot be part of the primary key",
            ));
        }
        if let Some(earlier) = columns
            .iter()
            .find(|c: &&ColumnField| c.column.value().eq_ignore_ascii_case(&column.value()))
        {
            return Err(syn::Error::new(
                column.span(),
                format!(
                    "column `{}` appears twice (also field `{}`); column names ignore case",
                    column.value(),
                    earlier.ident
                ),
            ));
        }
        columns.push(ColumnField {
            ident,
            ty: &field.ty,
            column,
            key,
            json,
        });
    }
    if !columns.iter().any(|c| c.key) {
        return Err(syn::Error::new(
            name.span(),
            "derive(Row): a table needs a primary key: mark at least one field #[flows(key)]",
        ));
    }

    let krate = &settings.krate;
    let table = &settings.table;
    let table_message = name_message("table", table);
    let derive = quote!(#krate::row::__derive);
    // One constant per check, spanned on what it checks, so that a failing check points
    // at the field.
    let checks = columns.iter().map(|c| {
        let (column, ty) = (&c.column, c.ty);
        let message = name_message("column", column);
        let name_check = quote_spanned!(column.span()=>
            const _: () = #derive::check_name(#column, #message);
        );
        let key_check = c
            .key
            .then(|| quote_spanned!(ty.span()=> const _: () = #derive::check_key::<#ty>();));
        quote!(#name_check #key_check)
    });
    let schema_columns = columns.iter().map(|c| {
        let (column, ty) = (&c.column, c.ty);
        match (c.key, c.json, option_inner(ty)) {
            (true, _, _) => quote_spanned!(ty.span()=> .key_of::<#ty>(#column)),
            (false, true, Some(_)) => {
                quote!(.nullable(#column, #krate::ColumnType::Json))
            }
            (false, true, None) => quote!(.column(#column, #krate::ColumnType::Json)),
            (false, false, _) => quote_spanned!(ty.span()=> .column_of::<#ty>(#column)),
        }
    });
    let to_values = columns.iter().map(|c| {
        let (ident, column) = (c.ident, &c.column);
        match (c.json, option_inner(c.ty)) {
            (true, Some(_)) => quote!(#derive::json_option_to_value(&self.#ident, #column)?),
            (true, None) => quote!(#derive::json_to_value(&self.#ident, #column)?),
            (false, _) => quote!(#krate::ColumnValue::to_value(&self.#ident)),
        }
    });
    let from_values = columns.iter().map(|c| {
        let (ident, column, ty) = (c.ident, &c.column, c.ty);
        match (c.json, option_inner(ty)) {
            (true, Some(_)) => {
                quote!(#ident: #derive::json_option_from_column(values.next(), #column)?)
            }
            (true, None) => quote!(#ident: #derive::json_from_column(values.next(), #column)?),
            (false, _) => quote_spanned!(ty.span()=>
                #ident: <#ty as #krate::ColumnValue>::from_column(values.next(), #column)?
            ),
        }
    });
    let skipped = skipped
        .iter()
        .map(|ident| quote!(#ident: ::core::default::Default::default()));
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        const _: () = #derive::check_name(#table, #table_message);
        #(#checks)*

        impl #impl_generics #krate::Row for #name #type_generics #where_clause {
            fn schema() -> #krate::TableSchema {
                static SCHEMA: ::std::sync::OnceLock<#krate::TableSchema> =
                    ::std::sync::OnceLock::new();
                SCHEMA
                    .get_or_init(|| {
                        #krate::TableSchema::builder(#table)
                            #(#schema_columns)*
                            .build()
                            .unwrap_or_else(|error| #derive::invalid_schema(error))
                    })
                    .clone()
            }

            fn to_values(&self) -> ::core::result::Result<
                ::std::vec::Vec<#krate::Value>,
                #krate::RowError,
            > {
                ::core::result::Result::Ok(::std::vec![#(#to_values),*])
            }

            fn from_values(
                values: ::std::vec::Vec<#krate::Value>,
            ) -> ::core::result::Result<Self, #krate::RowError> {
                let mut values = values.into_iter();
                ::core::result::Result::Ok(Self {
                    #(#from_values,)*
                    #(#skipped,)*
                })
            }
        }
    })
}

/// The struct's `#[flows(...)]` settings.
fn settings(input: &DeriveInput) -> syn::Result<Settings> {
    let mut table = None;
    let mut krate = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("flows")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("table") {
                table = Some(meta.value()?.parse::<LitStr>()?);
            } else if meta.path.is_ident("crate") {
                let path: LitStr = meta.value()?.parse()?;
                krate = Some(path.parse::<syn::Path>()?);
            } else {
                return Err(meta.error(
                    "unknown struct attribute: expected `table = \"…\"` or `crate = \"…\"`",
                ));
            }
            Ok(())
        })?;
    }
    let table = table
        .unwrap_or_else(|| LitStr::new(&snake_case(&input.ident.to_string()), input.ident.span()));
    let krate = match krate {
        Some(path) => quote!(#path),
        None => default_crate(),
    };
    Ok(Settings { table, krate })
}

/// Where `Row` lives for the crate being compiled: `flows` if it depends on it, else
/// `flows-core`.
fn default_crate() -> TokenStream2 {
    use proc_macro_crate::{FoundCrate, crate_name};
    for (package, fallback) in [("flows", "flows"), ("flows-core", "flows_core")] {
        match crate_name(package) {
            // Inside the package itself (its tests and examples see it by its name).
            Ok(FoundCrate::Itself) => {
                let ident = syn::Ident::new(fallback, Span::call_site());
                return quote!(::#ident);
            }
            Ok(FoundCrate::Name(name)) => {
                let ident = syn::Ident::new(&name, Span::call_site());
                return quote!(::#ident);
            }
            Err(_) => {}
        }
    }
    quote!(::flows)
}

/// What a failed name check says (a `const` panic cannot format the name itself).
fn name_message(kind: &str, name: &LitStr) -> String {
    format!(
        "invalid {kind} name {:?}: a name is an ASCII letter, then ASCII letters, digits or underscores, at most 48 characters",
        name.value()
    )
}

/// `T` when `ty` is written `Option<T>`.
fn option_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    match &last.arguments {
        syn::PathArguments::AngleBracketed(args) => match args.args.first()? {
            syn::GenericArgument::Type(inner) => Some(inner),
            _ => None,
        },
        _ => None,
    }
}

/// `WordCount` → `word_count`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
