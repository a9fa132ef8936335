//! `#[instructd::model]`, re-exported by `instructd`: see its documentation there.

use proc_macro::TokenStream;
use quote::quote;
use syn::{Attribute, Data, DeriveInput, parse_macro_input, parse_quote};

/// Keeps the doc comments of a type the LLM is sent (its own, its fields', its variants')
/// for Rust readers: each `#[doc]` becomes `#[cfg_attr(doc, doc = …)]`, which rustdoc still
/// reads and the derives after this attribute (schemars' `JsonSchema`) do not, so they never
/// become descriptions in the schema. What the model should read goes in
/// `#[schemars(description = "…")]`, as pydantic's `Field(description=…)`.
///
/// Put it above the `#[derive(…)]`.
#[proc_macro_attribute]
pub fn model(args: TokenStream, item: TokenStream) -> TokenStream {
    if !args.is_empty() {
        let error = syn::Error::new(proc_macro2::Span::call_site(), "#[instructd::model] takes no arguments");
        return error.to_compile_error().into();
    }
    let mut input = parse_macro_input!(item as DeriveInput);
    for_rustdoc_only(&mut input.attrs);
    match &mut input.data {
        Data::Struct(data) => data.fields.iter_mut().for_each(|field| for_rustdoc_only(&mut field.attrs)),
        Data::Enum(data) => data.variants.iter_mut().for_each(|variant| {
            for_rustdoc_only(&mut variant.attrs);
            variant.fields.iter_mut().for_each(|field| for_rustdoc_only(&mut field.attrs));
        }),
        Data::Union(data) => data.fields.named.iter_mut().for_each(|field| for_rustdoc_only(&mut field.attrs)),
    }
    // Without its docs in a normal build, the item would trip a crate's `missing_docs`.
    input.attrs.push(parse_quote!(#[cfg_attr(not(doc), allow(missing_docs))]));
    quote!(#input).into()
}

fn for_rustdoc_only(attrs: &mut [Attribute]) {
    for attr in attrs.iter_mut().filter(|attr| attr.path().is_ident("doc")) {
        if let syn::Meta::NameValue(doc) = &attr.meta {
            let text = &doc.value;
            *attr = parse_quote!(#[cfg_attr(doc, doc = #text)]);
        }
    }
}
